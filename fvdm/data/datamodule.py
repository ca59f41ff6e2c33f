"""Streaming WebDataset shards into training and validation batches (``ShapeDataModule``).

Train: an infinite, resampled stream for step-based training. Every (rank, worker) draws shards with
replacement from its own RNG, so the streams differ between ranks and workers. A resumed run knows
``step_offset``, the global step of its checkpoint (restored through :meth:`ShapeDataModule.load_state_dict`),
and ``cfg.resume`` says what it does with it: ``reseed`` (default) seeds the streams from
``(cfg.seed, rank, worker, step_offset, pass)``, so the resumed run draws fresh samples at once instead of
replaying the first ones (statistically the same stream, not the same samples); ``replay`` seeds them as the
first run did and has each worker regenerate and drop the batches it had delivered (the DataLoader takes
batch i from worker i mod num_workers), so training continues on exactly the batches an uninterrupted run
would have seen, at the cost of re-reading them (webdataset keeps no position to jump to).

Validation: deterministic and exactly once across ranks and workers, for any number of shards (see
:func:`split_samples`). Point subsampling there is seeded by the sample key, so metrics are reproducible.

Reading: a local shard is memory-mapped and only the rows drawn for a step are copied out of it (a sample
at default counts is ~11 MB, a step needs a few hundred kB of it); ``pipe:`` and remote URLs stream through
webdataset. Non-finite values are looked for in the drawn rows only (see :func:`take`).

A corrupt shard or a malformed sample is skipped and counted per worker (:class:`DataHealth`); every batch
carries its worker's running counts (``n_bad``, ``n_seen``) so a stage can log the bad fraction, and more
bad samples than ``cfg.max_bad_fraction`` stop the run with :class:`BadDataError`.
"""
from __future__ import annotations

import itertools
import os
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from fvdm.config import ConfigError, DataConfig
from fvdm.data.latents import latent_example
from fvdm.data.shards import MalformedSample, ShapeSample, ShardError, decode_sample, read_samples

MIN_SEEN = 20  # samples a worker must have seen before the bad fraction can stop the run
MAX_REASONS = 5  # failure reasons kept per worker for the error message
PIPE_BUFFER = 1 << 20  # bytes buffered from a pipe: or remote shard (webdataset's 8 KiB: ~15 % slower)


class BadDataError(RuntimeError):
    """More corrupt shards or malformed samples than ``data.max_bad_fraction`` allows."""


def world_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialized, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def is_local(url: str) -> bool:
    """Whether a shard URL names a local file (read memory-mapped) rather than a ``pipe:`` or remote URL."""
    return not url.startswith("pipe:") and "://" not in url


def expand_shards(spec: str, what: str = "shards", recursive: bool = False) -> list[str]:
    """Shard URLs from a path, directory (its ``*.tar``), brace pattern, ``::``-joined list or ``pipe:`` URL.

    Local files must exist (a clear error names the missing one); ``pipe:`` and ``scheme://`` URLs are
    passed through to webdataset untouched.
    """
    urls: list[str] = []
    for url in wds.shardlists.expand_urls(spec):
        if not is_local(url):
            urls.append(url)
            continue
        path = Path(url)
        if path.is_dir():
            found = sorted(path.rglob("*.tar") if recursive else path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"{what}: directory {path} holds no .tar shards")
            urls.extend(str(p) for p in found)
        elif path.is_file():
            urls.append(url)
        else:
            raise FileNotFoundError(f"{what}: shard {url} not found")
    if not urls:
        raise FileNotFoundError(f"{what}: '{spec}' names no shards")
    return urls


def split_samples(
    src: Iterable[dict], rank: int, world: int, worker: int, num_workers: int, limit: Optional[int] = None
) -> Iterator[dict]:
    """Keep the raw samples of one (rank, worker) slot: those at stream position j = slot (mod slots).

    Every slot reads all validation shards in the same order and keeps every ``world * num_workers``-th
    sample, starting at its own ``rank * num_workers + worker``. The slots partition the positions, so each
    sample is seen exactly once for any number of shards (1 shard or fewer shards than ranks included),
    no rank is left without data while there are at least as many samples as slots, and slot sizes differ
    by at most one. The price is that every slot reads (but decodes only its share of) every validation
    shard; validation sets are small. Positions at or beyond ``limit`` are dropped (``val_max_samples``).
    """
    slot, slots = rank * num_workers + worker, world * num_workers
    for j, sample in enumerate(src):
        if limit is not None and j >= limit:
            return
        if j % slots == slot:
            yield sample


def resampled_shards(urls: list[str], rng: np.random.Generator) -> Iterator[str]:
    """An infinite stream of shard URLs drawn uniformly with replacement (the training shard order)."""
    while True:
        yield urls[int(rng.integers(len(urls)))]


def stream_failure(exn: Exception, urls: Iterable[str]) -> Optional[tuple[str, str]]:
    """(shard URL, reason) when ``exn`` is a webdataset stream-level failure of one of ``urls``, else None.

    webdataset appends the shard URL to the args of errors that end a shard (open, read on); member-level
    errors do not carry it and either end the stream next (then reported here) or leave a sample with a
    missing field (then reported when it is decoded).
    """
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and a in urls), None)
    if url is None:
        return None
    message = next((a for a in exn.args if isinstance(a, str) and a != url), "")
    return url, f"{type(exn).__name__}: {message}".rstrip(": ")


@dataclass
class DataHealth:
    """Running good/bad sample counts of one worker, with the shards and reasons of its failures."""

    max_bad_fraction: float
    where: str  # e.g. "data.train rank 0 worker 1", for the error message
    good: int = 0
    bad: int = 0
    shards: Counter = field(default_factory=Counter)  # url -> failures
    reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS failures

    @property
    def seen(self) -> int:
        return self.good + self.bad

    def add_bad(self, url: str, reason: str) -> None:
        """Count one skipped sample (or lost shard remainder); raise once the fraction is too high."""
        self.bad += 1
        self.shards[url] += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(f"{url}: {reason}")
        self.check()

    def check(self) -> None:
        if self.seen >= MIN_SEEN and self.bad / self.seen > self.max_bad_fraction:
            shards = ", ".join(f"{u} ({n})" for u, n in self.shards.most_common(5))
            raise BadDataError(
                f"{self.where}: {self.bad} of {self.seen} samples bad ({self.bad / self.seen:.1%}), above "
                f"data.max_bad_fraction={self.max_bad_fraction}; bad shards: {shards}; first reasons: "
                + " | ".join(self.reasons)
            )


def keep_one_render(raw: dict, rng: Optional[np.random.Generator], index: Optional[int] = None) -> dict:
    """Drop all renders but one so that only it is decoded: render ``index`` when given (clamped to the last),
    else a random one with ``rng``, else render 0."""
    names = sorted(k for k in raw if k.startswith("render_") and k.endswith(".png"))
    if not names:
        return raw
    if index is not None:
        chosen = names[min(index, len(names) - 1)]
    else:
        chosen = names[int(rng.integers(len(names)))] if rng is not None else names[0]
    return {k: v for k, v in raw.items() if k not in names or k == chosen}


def take(s: ShapeSample, name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rows (a copy) of field ``name``, without replacement when there are enough, else with.

    Only these rows are checked for NaN/inf (a non-finite one makes the sample malformed): a sample is not
    scanned whole at read time, so a bad value in a row never drawn goes unnoticed (``fvdm inspect`` checks
    every value).
    """
    points = getattr(s, name)
    rows = np.take(points, rng.choice(len(points), n, replace=len(points) < n), axis=0)  # [n, W]; 2-3x points[idx]
    if not np.isfinite(rows).all():
        raise MalformedSample(f"sample {s.key}: field '{name}' has non-finite values")
    return rows


def subsample(s: ShapeSample, cfg: DataConfig, rng: np.random.Generator) -> dict[str, Any]:
    """A decoded shape -> one training example with the configured point counts (numpy, uint8 image)."""
    flag0 = np.zeros((cfg.num_surface, 1), np.float32)
    parts = [np.concatenate([take(s, "surface", cfg.num_surface, rng), flag0], axis=1)]  # [Ns, 7]
    if cfg.num_sharp:
        sharp = "sharp" if len(s.sharp) else "surface"  # no sharp edges: more uniform surface, flag 0
        flag = np.full((cfg.num_sharp, 1), 1.0 if len(s.sharp) else 0.0, np.float32)
        parts.append(np.concatenate([take(s, sharp, cfg.num_sharp, rng), flag], axis=1))  # [Ne, 7]
    example: dict[str, Any] = {
        "key": s.key,
        "surface": np.concatenate(parts),  # [Ns + Ne, 7] xyz, normal, sharp flag
        "vol": take(s, "vol", cfg.num_vol, rng),
        "near": take(s, "near", cfg.num_near, rng),
    }
    if s.renders:
        example["image"] = s.renders[0]  # [H, W, 3] uint8, the one render kept by keep_one_render
    return example


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Examples -> a batch: float32 tensors stacked on dim 0 (``surface``, ``vol``, ``near`` from shape shards,
    ``latents`` from latent shards), ``image`` as [B, 3, H, W] in [0, 1]."""
    batch: dict[str, Any] = {"key": [e["key"] for e in examples]}
    for name in ("surface", "vol", "near", "latents"):
        if name in examples[0]:
            batch[name] = torch.from_numpy(np.stack([e[name] for e in examples]))
    if all("image" in e for e in examples):
        shapes = {e["image"].shape for e in examples}
        if len(shapes) > 1:
            raise ValueError(f"renders of different sizes {sorted(shapes)} in one batch {batch['key']}: "
                             "a shard set must use one render size")
        images = torch.from_numpy(np.stack([e["image"] for e in examples]))  # [B, H, W, 3] uint8
        batch["image"] = images.permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, H, W]
    return batch


class ShapeStream(IterableDataset):
    """Batches from shards for one rank; each DataLoader worker builds its own webdataset pipeline.

    ``rank``/``world`` are explicit so that several ranks can be simulated without a process group.
    ``images=False`` leaves the renders undecoded and batches without ``image`` (for stages that use none).
    ``latents=True`` reads latent shards (``fvdm cache-latents``): batches carry ``latents`` drawn from each
    shape's stored posterior instead of point fields.
    A worker's :class:`DataHealth` lives in its copy of this dataset (running counts across passes).
    """

    def __init__(self, urls: list[str], cfg: DataConfig, train: bool, rank: int = 0, world: int = 1,
                 step_offset: int = 0, images: bool = True, latents: bool = False):
        super().__init__()
        self.urls, self.cfg, self.train, self.images, self.latents = urls, cfg, train, images, latents
        self.rank, self.world, self.step_offset = rank, world, step_offset
        self.shard_index = {u: i for i, u in enumerate(urls)}
        self.passes = 0
        self.health: Optional[DataHealth] = None

    def _shard_failed(self, url: str, reason: str) -> None:
        """Count a shard that cannot be opened or read on.

        In validation every slot reads every shard, so a failure is counted by one slot only (the shard's
        index modulo the slots) and thus once over all ranks and workers.
        """
        worker, num_workers = worker_info()
        if self.train or self.shard_index[url] % (self.world * num_workers) == self.rank * num_workers + worker:
            assert self.health is not None
            self.health.add_bad(url, reason)

    def _on_tar_error(self, exn: Exception) -> bool:
        """webdataset handler: count stream-level failures (see :func:`stream_failure`), skip the rest."""
        failure = stream_failure(exn, self.shard_index)
        if failure is not None:
            self._shard_failed(*failure)
        return True

    def _stream(self, url: str) -> Iterator[dict]:
        """Raw samples of a ``pipe:`` or remote shard: webdataset's tar stream reader (its
        ``tarfile_to_samples`` with a larger pipe buffer)."""
        opened = tariterators.url_opener(iter([{"url": url}]), handler=self._on_tar_error, bufsize=PIPE_BUFFER)
        files = tariterators.tar_file_expander(opened, handler=self._on_tar_error)
        return tariterators.group_by_keys(files, handler=self._on_tar_error)

    def _read(self, urls: Iterable[str]) -> Iterator[dict]:
        """Raw samples of each shard in turn: local files memory-mapped (:func:`read_samples`, no copies),
        ``pipe:`` and remote URLs streamed (:meth:`_stream`)."""
        for url in urls:
            if not is_local(url):
                yield from self._stream(url)
                continue
            try:
                yield from read_samples(url)
            except (OSError, ShardError) as e:
                self._shard_failed(url, f"{type(e).__name__}: {e}")

    def _examples(self, raws: Iterable[dict], rng: Optional[np.random.Generator]) -> Iterator[dict]:
        """Decode and subsample raw samples; malformed ones are counted and skipped."""
        assert self.health is not None
        for raw in raws:
            url = raw.get("__url__", "?")
            try:
                key_rng = rng if rng is not None else np.random.default_rng(
                    [self.cfg.seed, zlib.crc32(str(raw.get("__key__")).encode())])
                raw = keep_one_render(raw, rng, self.cfg.render_index) if self.images else raw
                if self.latents:
                    example = latent_example(raw, key_rng, self.images)
                else:
                    sample = decode_sample(raw, with_renders=self.images, check_finite=False)  # finite: take()
                    example = subsample(sample, self.cfg, key_rng)
            except MalformedSample as e:
                self.health.add_bad(url, str(e))
                continue
            self.health.good += 1
            yield example

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_info()
        if self.health is None:
            where = f"data.{'train' if self.train else 'val'} rank {self.rank} worker {worker}"
            self.health = DataHealth(self.cfg.max_bad_fraction, where)
        skip = 0
        if self.train:
            offset = self.step_offset if self.cfg.resume == "reseed" else 0
            rng = np.random.default_rng([self.cfg.seed, self.rank, worker, offset, self.passes])
            if self.cfg.resume == "replay" and self.passes == 0:
                skip = max(0, -(-(self.step_offset - worker) // num_workers))  # batches i < offset, i % W == w
            self.passes += 1
            examples = self._examples(self._read(resampled_shards(self.urls, rng)), rng)
            shuffle_rng = random.Random(int(rng.integers(2**63)))
            examples = wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=shuffle_rng)(examples)
            batch_size = self.cfg.batch_size
        else:
            raws = split_samples(self._read(self.urls), self.rank, self.world, worker, num_workers,
                                 self.cfg.val_max_samples)
            examples = self._examples(raws, None)
            batch_size = self.cfg.val_batch_size
        batches = wds.batched(batch_size, collation_fn=collate, partial=True)(examples)
        for batch in itertools.islice(batches, skip, None):
            batch["n_bad"] = torch.tensor(self.health.bad)
            batch["n_seen"] = torch.tensor(self.health.seen)
            yield batch


class ShapeDataModule(L.LightningDataModule):
    """Train and validation DataLoaders over shards; its state (the step offset) rides in checkpoints.

    Resuming restores the stage's global step, model and optimizer from the Lightning checkpoint; this
    module restores only ``step_offset`` (the global step when the checkpoint was written), from which the
    train stream is re-seeded or replayed (``cfg.resume``, see the module doc).

    ``images=False`` skips decoding the renders (batches then carry no ``image``): for stages that use none.
    ``latents``: latent shards (``fvdm cache-latents``) that the training stream reads instead of
    ``cfg.train``; validation still reads ``cfg.val``, whose point samples the evaluation needs.
    """

    def __init__(self, cfg: DataConfig, images: bool = True, latents: Optional[str] = None):
        super().__init__()
        if cfg.resume not in ("reseed", "replay"):
            raise ConfigError(f"data.resume: unknown '{cfg.resume}' (reseed or replay)")
        self.cfg, self.images, self.latents = cfg, images, latents
        self.step_offset = 0

    def train_dataset(self, rank: Optional[int] = None, world: Optional[int] = None) -> ShapeStream:
        r, w = world_info()
        urls = expand_shards(self.latents, "latents") if self.latents else expand_shards(self.cfg.train, "data.train")
        return ShapeStream(urls, self.cfg, True, r if rank is None else rank, w if world is None else world,
                           self.step_offset, self.images, latents=bool(self.latents))

    def val_dataset(self, rank: Optional[int] = None, world: Optional[int] = None) -> ShapeStream:
        r, w = world_info()
        urls = expand_shards(self.cfg.val, "data.val")
        return ShapeStream(urls, self.cfg, False, r if rank is None else rank, w if world is None else world,
                           images=self.images)

    def _loader(self, dataset: ShapeStream) -> DataLoader:
        """A DataLoader with its own generator: the workers' seeds come from it, not from a draw of the global
        RNG, so starting an iterator leaves the training noise (and its resume) alone."""
        n = self.cfg.num_workers
        return DataLoader(dataset, batch_size=None, num_workers=n, persistent_workers=n > 0,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.cfg.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset())

    def state_dict(self) -> dict[str, Any]:
        """The global step now (or the restored offset when not attached to a trainer)."""
        trainer = self.trainer
        return {"step_offset": int(trainer.global_step) if trainer is not None else self.step_offset}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step_offset = int(state_dict["step_offset"])
