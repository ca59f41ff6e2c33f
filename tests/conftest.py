"""Shared fixtures: a small procedural shard set made once per test session."""
from __future__ import annotations

import pytest

from fvdm.data.sampling import SampleCounts
from fvdm.data.synth import run_synth

TINY_COUNTS = SampleCounts(surface=1024, sharp=256, vol=2048, near=2048, renders=1, render_size=48)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """12 procedural shapes (train/ and val/ shards) with tiny per-shape counts."""
    out = tmp_path_factory.mktemp("synth")
    run_synth(out, num=12, seed=0, val_fraction=0.25, counts=TINY_COUNTS, workers=1, shard_size=4)
    return out
