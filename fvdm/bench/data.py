"""``fvdm bench data``: prepare throughput against the bare signed-distance kernel, and streaming throughput.

(a) One ~100k-face procedural mesh (a bumpy, creased torus) goes through the whole ``prepare`` pipeline at
default SampleCounts; the bare kernel (exact distance + winding-number sign, BVHs included) then runs on
the same volume and near-surface points, so ``prepare_over_sdf`` is the pipeline's overhead (target <= 1.5).
(b) Copies of that prepared sample are written to shards with ShardWriter and streamed through
``ShapeDataModule``'s train loader (target >= 200 samples/s per core), with one render decoded per sample
and without (``images=False``, what a VAE stage needs). Two rates each: wall samples/s through a DataLoader
with ``--stream-workers`` workers (what a run sees; it drops when other jobs share the cores), and samples
per CPU-second of a process running the pipeline alone on one thread (the per-core cost, steady under
load). Sample size in MB and MB/s are recorded beside them. Results go to benchmarks/results.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import trimesh

from fvdm.bench.results import DEFAULT_PATH, record
from fvdm.config import DataConfig
from fvdm.data.mesh import MeshSDF, load_mesh, normalize
from fvdm.data.prepare import run_prepare
from fvdm.data.render import render_views
from fvdm.data.sampling import SampleCounts
from fvdm.data.shards import ShardWriter, decode_sample, iter_tar, shard_pattern


def bumpy_torus(major: int, minor: int) -> trimesh.Trimesh:
    """A watertight torus (2 * major * minor faces) with creases around the tube and waves along it."""
    t = trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=major, minor_sections=minor)
    v = t.vertices
    theta = np.arctan2(v[:, 1], v[:, 0])  # angle along the ring
    ring = np.stack([np.cos(theta), np.sin(theta), np.zeros_like(theta)], axis=1)  # [V, 3] tube centres
    tube = v - ring
    phi = np.arctan2(tube[:, 2], (tube * ring).sum(axis=1))  # angle around the tube
    scale = 1 + 0.25 * np.abs(np.sin(3 * phi)) + 0.15 * np.sin(7 * theta)  # |sin| makes sharp creases
    return trimesh.Trimesh(ring + tube * scale[:, None], t.faces)


def bench_prepare(work: Path, counts: SampleCounts, major: int, minor: int) -> tuple[dict, Path]:
    """Time ``run_prepare`` on one mesh and the bare SDF on the same points; returns figures and the shard dir."""
    mesh_path = work / "torus.ply"
    bumpy_torus(major, minor).export(mesh_path)
    out = work / "prepared"
    start = time.perf_counter()
    report = run_prepare([str(mesh_path)], out, counts=counts, workers=1)
    prepare_s = time.perf_counter() - start
    if report.succeeded != 1:
        raise RuntimeError(f"bench mesh failed to prepare: {report.failed}")
    (sample,) = (decode_sample(raw) for raw in iter_tar(next(out.glob("shard-*.tar"))))
    points = np.concatenate([sample.vol, sample.near])[:, :3]  # [Nv + Nn, 3], the points prepare evaluated
    norm, _, _ = normalize(load_mesh(mesh_path), counts.margin)
    start = time.perf_counter()
    MeshSDF(norm.vertices, norm.faces)(points)
    sdf_s = time.perf_counter() - start
    start = time.perf_counter()
    render_views(norm.vertices, norm.faces, counts.renders, counts.render_size)
    render_s = time.perf_counter() - start
    cores = len(os.sched_getaffinity(0))
    return {
        "mesh_faces": len(norm.faces),
        "sdf_points": len(points),
        "cores": cores,
        "prepare_s": round(prepare_s, 3),
        "bare_sdf_s": round(sdf_s, 3),
        "renders_s": round(render_s, 3),
        "prepare_over_sdf": round(prepare_s / sdf_s, 3),
        "prepare_meshes_per_s": round(1 / prepare_s, 4),
        "prepare_meshes_per_s_per_core": round(1 / prepare_s / cores, 4),
    }, out


def stream_rate(cfg: DataConfig, images: bool, batches: int, cpu: bool = False) -> float:
    """Samples per wall second, or per CPU-second of this process with ``cpu`` (then use no workers)."""
    from fvdm.data.datamodule import ShapeDataModule  # imports torch and lightning: only when streaming

    batches_iter = iter(ShapeDataModule(cfg, images=images).train_dataloader())
    next(batches_iter)  # warm-up: worker start and the shuffle buffer's initial fill
    clock = time.process_time if cpu else time.perf_counter
    start = clock()
    n = sum(len(next(batches_iter)["key"]) for _ in range(batches))
    return n / (clock() - start)


def bench_stream(work: Path, prepared: Path, copies: int, batches: int, workers: int) -> tuple[dict, dict]:
    """Streaming rates through ShapeDataModule's train loader over ``copies`` of the prepared sample,
    and the points drawn per sample."""
    raw = next(iter_tar(next(prepared.glob("shard-*.tar"))))
    sample = decode_sample(raw)
    shards = work / "stream"
    with ShardWriter(shards, max_count=16) as writer:
        for i in range(copies):
            writer.write(replace(sample, key=f"{sample.key[:16]}{i:05d}"))
    cfg = DataConfig(train=shard_pattern(shards), val=shard_pattern(shards), num_workers=workers)
    sample_mb = sum(len(v) for k, v in raw.items() if k != "__key__") / 2**20
    figures: dict = {"stream_workers": workers, "stream_batch_size": cfg.batch_size,
                     "stream_sample_mb": round(sample_mb, 2)}
    threads = torch.get_num_threads()
    for images, tag in ((True, "stream"), (False, "stream_no_image")):
        wall = stream_rate(cfg, images, batches)
        torch.set_num_threads(1)  # as in a DataLoader worker
        cpu = stream_rate(replace(cfg, num_workers=0), images, batches, cpu=True)
        torch.set_num_threads(threads)
        figures |= {
            f"{tag}_samples_per_s": round(wall, 1),
            f"{tag}_samples_per_s_per_core": round(wall / max(workers, 1), 1),
            f"{tag}_samples_per_cpu_s": round(cpu, 1),
            f"{tag}_mb_per_cpu_s": round(cpu * sample_mb, 1),
        }
    draws = {k: getattr(cfg, k) for k in ("num_surface", "num_sharp", "num_vol", "num_near", "shuffle_buffer")}
    return figures, draws


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fvdm bench data", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small mesh and counts: a smoke run of a few seconds")
    p.add_argument("--stream-workers", type=int, default=1, help="DataLoader workers for the streaming part")
    p.add_argument("--batches", type=int, default=None, help="timed batches (default 50, quick 5)")
    p.add_argument("--results", default=str(DEFAULT_PATH), help="results file to append to")
    args = p.parse_args(argv)
    if args.quick:
        counts = SampleCounts(surface=10_000, sharp=2_500, vol=25_000, near=25_000, renders=2, render_size=128)
        major, minor, copies, batches = 100, 50, 16, args.batches or 5
    else:
        counts = SampleCounts()
        major, minor, copies, batches = 400, 125, 64, args.batches or 50  # 100,000 faces
    with tempfile.TemporaryDirectory(prefix="fvdm-bench-data-") as tmp:
        figures, prepared = bench_prepare(Path(tmp), counts, major, minor)
        stream, draws = bench_stream(Path(tmp), prepared, copies, batches, args.stream_workers)
    figures |= stream
    record("data", figures, path=args.results, quick=args.quick, counts=asdict(counts), stream_draws=draws)
    width = max(map(len, figures))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in figures.items()))
    print(f"targets: prepare_over_sdf <= 1.5, streaming >= 200 samples/s per core; recorded in {args.results}")
