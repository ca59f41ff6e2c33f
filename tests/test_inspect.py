"""fvdm inspect: counts, point spreads, SDF ranges, renders, watertight, sources and failures of a shard set."""
from __future__ import annotations

import numpy as np
import pytest

from fvdm.cli import main
from fvdm.data.inspect import inspect_shards
from fvdm.data.shards import ShapeSample, ShardWriter


def sample(key: str, rng: np.random.Generator, n: int, renders: int, meta: dict, sharp: int = 3) -> ShapeSample:
    return ShapeSample(
        key=key,
        surface=rng.normal(size=(n, 6)).astype(np.float32),
        sharp=rng.normal(size=(sharp, 6)).astype(np.float32),
        vol=rng.uniform(-1, 1, size=(2 * n, 4)).astype(np.float32),
        near=rng.normal(0, 0.1, size=(n + 1, 4)).astype(np.float32),
        renders=[np.full((4, 4, 3), 255, np.uint8)] * renders,
        meta=meta,
    )


@pytest.fixture
def shard_set(tmp_path):
    rng = np.random.default_rng(0)
    good = [
        sample("a", rng, 10, 2, {"source": "/meshes/a.obj", "watertight": True}),
        sample("b", rng, 20, 0, {"source": "/meshes/b.PLY", "watertight": False}, sharp=0),
        sample("c", rng, 30, 1, {"source": "synth:7", "watertight": True}),
        sample("d", rng, 40, 3, {"source": "synth:8"}),
    ]
    broken = sample("e", rng, 5, 1, {"source": "synth:9"})
    broken.near = broken.near[:, :3]  # malformed: [N, 3] instead of [N, 4]
    with ShardWriter(tmp_path / "train", max_count=3) as w:  # train/shard-000000 (a b c), -000001 (d e)
        for s in good + [broken]:
            w.write(s)
    with ShardWriter(tmp_path / "val", max_count=3) as w:  # a shard cut inside its first member
        w.write(sample("f", rng, 10, 1, {"source": "synth:10"}))
    cut = tmp_path / "val" / "shard-000000.tar"
    cut.write_bytes(cut.read_bytes()[:700])
    return tmp_path, good


def test_inspect_reports_counts_ranges_and_failures(shard_set):
    root, good = shard_set
    stats = inspect_shards(str(root))
    assert len(stats.shards) == 3 and stats.samples == 4
    reasons = [r for _, r in stats.bad]
    assert len(stats.bad) == 2
    assert any("sample e: field 'near' has shape" in r for r in reasons)
    assert any("rest of shard unreadable" in r for r in reasons)
    assert stats.bad[-1][0].endswith("val/shard-000000.tar")

    assert (stats.points["surface"].lo, stats.points["surface"].mean, stats.points["surface"].hi) == (10, 25, 40)
    assert (stats.points["sharp"].lo, stats.points["sharp"].hi) == (0, 3)
    assert stats.points["vol"].mean == 50 and stats.points["near"].hi == 41
    vol = np.concatenate([s.vol[:, 3] for s in good])
    near = np.concatenate([s.near[:, 3] for s in good])
    assert stats.sdf["vol"].lo == pytest.approx(vol.min()) and stats.sdf["vol"].hi == pytest.approx(vol.max())
    assert stats.sdf["near"].lo == pytest.approx(near.min()) and stats.sdf["near"].hi == pytest.approx(near.max())
    assert stats.sdf["vol"].inside_fraction == pytest.approx((vol < 0).mean())  # SDF negative inside
    assert stats.sdf["near"].inside == (near < 0).sum()
    assert (stats.renders.lo, stats.renders.mean, stats.renders.hi) == (0, 1.5, 3)
    assert stats.watertight == 2
    assert dict(stats.sources) == {".obj": 1, ".ply": 1, "synth": 2} and len(stats.distinct_sources) == 4

    table = stats.table()
    assert "samples           4 good, 2 bad" in table
    assert "10 / 25 / 40" in table and "watertight        2 of 4" in table
    assert f"{(vol < 0).mean():.1%}" in table and "synth 2" in table


def test_inspect_pattern_and_cli(shard_set, capsys):
    root, _ = shard_set
    stats = inspect_shards(str(root / "train" / "shard-{000000..000000}.tar"))
    assert len(stats.shards) == 1 and stats.samples == 3 and not stats.bad
    assert main(["inspect", str(root / "train")]) == 0
    out = capsys.readouterr().out
    assert "shards            2" in out and "sample e:" in out
    with pytest.raises(FileNotFoundError, match="nothing.tar not found"):
        inspect_shards(str(root / "nothing.tar"))
