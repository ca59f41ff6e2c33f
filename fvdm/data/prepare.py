"""``fvdm prepare``: real meshes (OBJ/PLY/STL/OFF/GLB) -> shard samples, in parallel, resumable, failure-tolerant.

Each mesh's sample key is the SHA-256 of its file bytes, so a rerun skips what is already written (and a file
copied under two names is prepared once). Workers build samples; the main process alone writes shards. A mesh
that cannot be processed is skipped and listed with its reason in ``out/failures.jsonl`` (rewritten each run:
failed meshes are retried on the next run).
"""
from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fvdm.data.mesh import (MESH_EXTENSIONS, MeshError, MeshSDF, load_mesh, normalize, sample_sharp_edges,
                            sample_surface, watertight_remesh)
from fvdm.data.progress import progress
from fvdm.data.render import render_views
from fvdm.data.sampling import SampleCounts, sdf_samples
from fvdm.data.shards import ShapeSample, ShardWriter, written_keys

FAILURES = "failures.jsonl"


@dataclass
class PrepareReport:
    """Outcome of one ``run_prepare``: counts of prepared and skipped meshes, and (file, reason) per failure."""

    succeeded: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped_existing: int = 0  # already in a complete shard, or a byte-identical copy of a mesh prepared now

    def summary(self, out: Path) -> str:
        lines = [f"fvdm prepare: {self.succeeded} succeeded, {len(self.failed)} failed, "
                 f"{self.skipped_existing} skipped (already written) -> {out}"]
        if self.failed:
            lines.append(f"failures ({out / FAILURES}):")
            lines += [f"  {path}: {reason}" for path, reason in self.failed[:10]]
            if len(self.failed) > 10:
                lines.append(f"  ... and {len(self.failed) - 10} more")
        return "\n".join(lines)


def find_meshes(inputs: str | Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, directories (recursively) and globs to mesh files; inputs matching nothing are failures."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    files: dict[Path, None] = {}  # ordered set
    missing: list[tuple[str, str]] = []

    def add_dir(d: Path) -> None:
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix.lower() in MESH_EXTENSIONS:
                files.setdefault(p)

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            add_dir(p)
        elif p.is_file():
            files.setdefault(p)  # named explicitly: an unsupported extension is reported by load_mesh
        elif any(c in item for c in "*?["):
            before = len(files)
            for match in sorted(glob.glob(item, recursive=True)):
                m = Path(match)
                if m.is_dir():
                    add_dir(m)
                elif m.suffix.lower() in MESH_EXTENSIONS:
                    files.setdefault(m)
            if len(files) == before:
                missing.append((item, "pattern matched no mesh files"))
        else:
            missing.append((item, "no such file or directory"))
    return list(files), missing


def content_hash(path: Path) -> str:
    """SHA-256 hex digest of the file's bytes (the sample key: no dots, stable across renames)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_mesh(path: str | Path, key: str, counts: SampleCounts, watertight: bool = False, seed: int = 0,
                 max_faces: int = 2_000_000) -> ShapeSample:
    """One mesh file -> one shard sample; raises MeshError (or any error of a library) when it cannot."""
    rng = np.random.default_rng([seed, int(key[:16], 16)])  # per mesh, independent of processing order
    mesh = load_mesh(path, max_faces=max_faces)
    norm, center, scale = normalize(mesh, counts.margin)
    sdf = MeshSDF(norm.vertices, norm.faces)  # always the original surface: GWN sign handles holes
    try:
        source = watertight_remesh(norm.vertices, norm.faces) if watertight else norm
    except ValueError as e:
        raise MeshError(path, f"watertight remesh failed: {e}") from e
    surface = sample_surface(source, counts.surface, rng)
    sharp = sample_sharp_edges(norm, counts.sharp, rng)
    vol, near = sdf_samples(surface, sharp, sdf, counts, rng)
    if not (np.isfinite(vol).all() and np.isfinite(near).all()):
        raise MeshError(path, "signed distance produced non-finite values")
    renders = render_views(norm.vertices, norm.faces, counts.renders, counts.render_size,
                           seed=int(rng.integers(2**31)))
    meta = {
        "source": str(path),
        "content_hash": key,
        "normalization": {"center": [float(c) for c in center], "scale": float(scale)},
        "watertight": bool(mesh.is_watertight),  # of the input, after merging vertices by position
        "watertight_remesh": watertight,
        "num_vertices": len(mesh.vertices),
        "num_faces": len(mesh.faces),
        "counts": asdict(counts),
        "seed": seed,
        "generator": {"name": "fvdm.data.prepare", "watertight_remesh": watertight},
    }
    return ShapeSample(key=key, surface=surface, sharp=sharp, vol=vol, near=near, renders=renders, meta=meta)


@dataclass(frozen=True)
class _Job:
    path: str
    key: str
    counts: SampleCounts
    watertight: bool
    seed: int
    max_faces: int


Result = tuple[_Job, ShapeSample | None, str | None]  # (job, sample, None) or (job, None, reason)


def _work(job: _Job) -> Result:
    """Prepare one mesh; never raises, so one bad mesh cannot stop the run."""
    try:
        return job, prepare_mesh(job.path, job.key, job.counts, job.watertight, job.seed, job.max_faces), None
    except MeshError as e:
        return job, None, e.reason
    except Exception as e:
        return job, None, f"{type(e).__name__}: {e}"


def _init_worker(threads: int) -> None:
    os.environ["IGL_NUM_THREADS"] = str(threads)  # share the cores between workers instead of oversubscribing


def _run_pool(jobs: list[_Job], workers: int) -> Iterator[Result]:
    """Results of ``_work`` from ``workers`` processes.

    A worker that dies (segfault in a native library, out of memory) breaks the pool; the meshes then in
    flight are retried one at a time in a fresh process, and one that breaks it alone is reported failed.
    """
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    queue, suspects = deque(jobs), deque()
    while queue or suspects:
        solo = bool(suspects)
        source, limit = (suspects, 1) if solo else (queue, 2 * workers)
        inflight, broken = {}, []
        with ProcessPoolExecutor(1 if solo else workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            while (source or inflight) and not broken:
                while source and len(inflight) < limit:
                    job = source.popleft()
                    inflight[pool.submit(_work, job)] = job
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    job, exc = inflight.pop(fut), fut.exception()
                    if isinstance(exc, BrokenProcessPool):
                        broken.append(job)
                    elif exc is not None:  # e.g. a result that could not be sent back
                        yield job, None, f"{type(exc).__name__}: {exc}"
                    else:
                        yield fut.result()
        if broken:
            broken += inflight.values()
            if solo:
                yield broken[0], None, "worker process died (native crash or out of memory)"
            else:
                suspects.extend(broken)


def run_prepare(meshes: str | list[str], out: str | Path, counts: SampleCounts = SampleCounts(), workers: int = 1,
                shard_size: int = 64, watertight: bool = False, seed: int = 0,
                max_faces: int = 2_000_000) -> PrepareReport:
    """Prepare every mesh under ``meshes`` (files, directories, globs) into shards in ``out``; see module doc."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, failed = find_meshes(meshes)
    report = PrepareReport(failed=failed)
    done = written_keys(out)
    jobs: list[_Job] = []
    copies: dict[str, list[str]] = {}  # key -> further files with the same bytes, prepared once
    for f in files:
        try:
            key = content_hash(f)
        except OSError as e:
            report.failed.append((str(f), f"cannot read: {e}"))
            continue
        if key in done:
            report.skipped_existing += 1
        elif key in copies:
            copies[key].append(str(f))
        else:
            copies[key] = []
            jobs.append(_Job(str(f), key, counts, watertight, seed, max_faces))
    results = _run_pool(jobs, workers) if workers > 1 else map(_work, jobs)
    with open(out / FAILURES, "w") as log, ShardWriter(out, max_count=shard_size) as writer:
        for path, reason in report.failed:
            log.write(json.dumps({"file": path, "reason": reason}) + "\n")
        for job, sample, reason in progress(results, len(jobs), "prepare", "mesh"):
            if sample is not None:
                writer.write(sample)
                report.succeeded += 1
                report.skipped_existing += len(copies[job.key])
                continue
            for path in [job.path, *copies[job.key]]:
                report.failed.append((path, reason))
                log.write(json.dumps({"file": path, "reason": reason}) + "\n")
            log.flush()
    print(report.summary(out))
    return report
