"""``fvdm inspect``: statistics of a shard set (samples, points, SDF ranges, renders, failures) as a text table."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from fvdm.data.datamodule import expand_shards, stream_failure
from fvdm.data.shards import FIELDS, MalformedSample, decode_sample

MAX_BAD_LINES = 20  # failures listed in the table; the rest are counted


@dataclass
class Spread:
    """Min / mean / max of a per-sample number."""

    n: int = 0
    total: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")

    def add(self, x: float) -> None:
        self.n, self.total = self.n + 1, self.total + x
        self.lo, self.hi = min(self.lo, x), max(self.hi, x)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def row(self, fmt: str = "{:.0f}") -> str:
        if not self.n:
            return "-"
        return " / ".join(fmt.format(v) for v in (self.lo, self.mean, self.hi))


@dataclass
class SDFRange:
    """Range of SDF values over all samples of one field, and the share inside (SDF < 0)."""

    lo: float = float("inf")
    hi: float = float("-inf")
    inside: int = 0
    total: int = 0

    def add(self, sdf: np.ndarray) -> None:
        self.lo, self.hi = min(self.lo, float(sdf.min())), max(self.hi, float(sdf.max()))
        self.inside += int((sdf < 0).sum())
        self.total += len(sdf)

    @property
    def inside_fraction(self) -> float:
        return self.inside / self.total if self.total else float("nan")


def source_kind(source: str) -> str:
    """A mesh path's suffix (``.obj``), else the part before the first ``:`` (``synth:...`` -> ``synth``)."""
    return Path(source).suffix.lower() or source.split(":", 1)[0]


@dataclass
class ShardStats:
    """What :func:`inspect_shards` found."""

    shards: list[str] = field(default_factory=list)
    samples: int = 0  # good samples
    bad: list[tuple[str, str]] = field(default_factory=list)  # (shard, reason)
    points: dict[str, Spread] = field(default_factory=lambda: {f: Spread() for f in FIELDS})
    sdf: dict[str, SDFRange] = field(default_factory=lambda: {"vol": SDFRange(), "near": SDFRange()})
    renders: Spread = field(default_factory=Spread)
    watertight: int = 0
    sources: Counter = field(default_factory=Counter)  # source kind -> samples
    distinct_sources: set = field(default_factory=set)

    def table(self) -> str:
        lines = [
            f"{'shards':<18}{len(self.shards)}",
            f"{'samples':<18}{self.samples} good, {len(self.bad)} bad",
            f"{'points':<18}min / mean / max",
        ]
        lines += [f"  {name:<16}{self.points[name].row()}" for name in FIELDS]
        lines.append(f"{'SDF':<18}{'min':>9} {'max':>9} {'inside':>8}")
        for name, r in self.sdf.items():
            if r.total:
                lines.append(f"  {name:<16}{r.lo:>9.4f} {r.hi:>9.4f} {r.inside_fraction:>8.1%}")
            else:
                lines.append(f"  {name:<16}{'-':>9} {'-':>9} {'-':>8}")
        lines.append(f"{'renders/sample':<18}{self.renders.row('{:.1f}')}")
        lines.append(f"{'watertight':<18}{self.watertight} of {self.samples}")
        kinds = ", ".join(f"{k} {n}" for k, n in self.sources.most_common()) or "-"
        lines.append(f"{'sources':<18}{kinds} ({len(self.distinct_sources)} distinct)")
        if self.bad:
            lines.append("bad samples and unreadable shard rests")
            lines += [f"  {shard}: {reason}" for shard, reason in self.bad[:MAX_BAD_LINES]]
            if len(self.bad) > MAX_BAD_LINES:
                lines.append(f"  ... and {len(self.bad) - MAX_BAD_LINES} more")
        return "\n".join(lines)

    def add(self, raw: dict, shard: str) -> None:
        """Decode one raw sample and add it to the statistics (or to ``bad`` with the reason)."""
        try:
            s = decode_sample(raw)
        except MalformedSample as e:
            self.bad.append((shard, str(e)))
            return
        self.samples += 1
        for name in FIELDS:
            self.points[name].add(len(getattr(s, name)))
        self.sdf["vol"].add(s.vol[:, 3])
        self.sdf["near"].add(s.near[:, 3])
        self.renders.add(len(s.renders))
        self.watertight += bool(s.meta.get("watertight", False))
        source = str(s.meta.get("source", "unknown"))
        self.sources[source_kind(source)] += 1
        self.distinct_sources.add(source)


def inspect_shards(pattern_or_dir: str) -> ShardStats:
    """Read every shard (a path, brace pattern, ``pipe:`` URL, or a directory searched recursively)."""
    stats = ShardStats(shards=expand_shards(pattern_or_dir, "inspect", recursive=True))
    for url in stats.shards:

        def on_error(exn: Exception, url: str = url) -> bool:
            failure = stream_failure(exn, (url,))
            if failure is not None:
                stats.bad.append((url, f"rest of shard unreadable: {failure[1]}"))
            return True

        for raw in wds.tarfile_to_samples(handler=on_error)(iter([{"url": url}])):
            stats.add(raw, url)
    return stats
