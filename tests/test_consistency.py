"""The consistency grid, phases, loss and few-step time grids (fvdm.consistency)."""
from __future__ import annotations

import pytest
import torch

from fvdm.consistency import PhaseGrid, phased_grid, pseudo_huber, turbo_grid


def test_grid_edges_are_data_side_and_exact():
    grid = PhaseGrid(num_points=100, phases=5)
    j = torch.arange(100)
    t, t_next, s = grid.times(j)
    assert torch.equal(grid.edge_index(j), (j // 20 + 1) * 20)
    assert (s > t).all() and (s >= t_next).all() and (s - t <= 0.2 + 1e-6).all()
    on_edge = (j + 1) % 20 == 0
    assert torch.equal(t_next[on_edge], s[on_edge])  # bit-identical: both from the same integer
    assert (s[~on_edge] > t_next[~on_edge]).all()
    assert torch.equal(torch.unique(s), torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0]))
    one = PhaseGrid(100, 1)
    assert torch.equal(one.times(j)[2], torch.ones(100))
    with pytest.raises(ValueError, match="divide"):
        PhaseGrid(100, 3).validate()


def test_grid_sampling_covers_every_index():
    g = torch.Generator().manual_seed(0)
    t, _, _ = PhaseGrid(100, 5).sample(5000, generator=g)
    assert torch.equal(torch.unique(t), torch.arange(100) / 100.0)


def test_pseudo_huber():
    a = torch.zeros(1000)
    assert pseudo_huber(a, a, 1e-3) == 0
    assert pseudo_huber(a + 1.0, a, 1e-3) == pytest.approx(1.0, abs=1e-3)  # ~ |d| far out
    assert pseudo_huber(a + 1e-5, a, 1e-3) == pytest.approx(1e-10 / 2e-3, rel=1e-2)  # ~ d^2 / 2c near 0


def test_phased_grids():
    assert torch.allclose(phased_grid(5, 5), torch.tensor([0, 0.2, 0.4, 0.6, 0.8, 1], dtype=torch.float64))
    assert torch.allclose(phased_grid(1, 5), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(phased_grid(2, 5), torch.tensor([0, 0.4, 1], dtype=torch.float64))
    assert torch.allclose(phased_grid(3, 5), torch.tensor([0, 0.2, 0.6, 1], dtype=torch.float64))
    ten = phased_grid(10, 5)
    assert len(ten) == 11 and torch.allclose(ten[::2], phased_grid(5, 5))  # every edge kept, phases halved
    assert torch.allclose(phased_grid(3, 1), torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64))


def test_turbo_grid_is_the_released_one():
    assert torch.allclose(turbo_grid(5), torch.tensor([0, 0.1992, 0.3994, 0.5996, 0.7998, 1], dtype=torch.float64),
                          atol=1e-4)
    assert torch.allclose(turbo_grid(2), torch.tensor([0, 0.4995, 1], dtype=torch.float64), atol=1e-4)
    assert torch.allclose(turbo_grid(3), torch.tensor([0, 0.3293, 0.6597, 1], dtype=torch.float64), atol=1e-4)
