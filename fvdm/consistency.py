"""Multiphase consistency on the flow ODE (PCM adapted to fvdm's convention, ``fvdm.flow``: t = 0 noise,
t = 1 data): the discretisation grid, its phases, the training pair, the loss, and few-step time grids.

The grid has N points t_j = j / N (N = 1000 / k: the paper's skipping step k = 10 is the stride over 1000
training timesteps, so one teacher step is dt = 1 / N = 0.01). P phases (P | N) of N / P intervals each;
phase p covers [p / P, (p + 1) / P) and maps to its data-side edge (p + 1) / P. All times are derived from
integer indices with one division each, so a teacher step that lands on an edge gives t' == s exactly and
the target's jump (s - t') f is exactly zero: the boundary condition f(x, s) = x holds by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# the released turbo scheduler's grid: linspace(0, 1, 1000) at indices [0, 9, 19, ..., 989] (pcm_timesteps 100)
TURBO_TRAIN_TIMESTEPS, TURBO_PCM_TIMESTEPS = 1000, 100


@dataclass
class PhaseGrid:
    """N grid intervals over [0, 1] split into P phases."""

    num_points: int = 100  # N
    phases: int = 5  # P

    def validate(self) -> None:
        if self.num_points < 1 or self.phases < 1 or self.num_points % self.phases:
            raise ValueError(f"consistency grid: phases ({self.phases}) must divide num_points "
                             f"({self.num_points}), both >= 1")

    def edge_index(self, j: torch.Tensor) -> torch.Tensor:
        """Grid index of the data-side edge of the phase holding grid index ``j`` (int64)."""
        per = self.num_points // self.phases
        return (j // per + 1) * per

    def sample(self, batch: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample j ~ U{0..N-1}: times (t_j, t_{j+1}, edge s), each [B] float32 from integer indices."""
        j = torch.randint(self.num_points, (batch,), generator=generator, device=generator.device
                          if generator is not None else device).to(device)
        return self.times(j)

    def times(self, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t_j, t_{j+1}, s) for integer indices ``j`` [B]."""
        n = float(self.num_points)
        return j / n, (j + 1) / n, self.edge_index(j) / n


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """mean over elements of sqrt((a - b)^2 + c^2) - c (elementwise, as PCM; not iCT's whole-vector norm)."""
    return (torch.sqrt((a.float() - b.float()).square() + c * c) - c).mean()


def phased_grid(steps: int, phases: int) -> torch.Tensor:
    """[steps + 1] float64 sampling times from 0 to 1 for a P-phase student.

    steps == P: the phase edges (0, 1/P, ..., 1). steps < P: a subset of edges picked like the released turbo
    scheduler (floor(linspace(0, P, steps, endpoint=False)) / P, then 1). steps > P: each phase split into
    equal parts (the first ``steps % P`` phases get one more). Both non-P cases are approximations for a
    P-phase student; after the phase-1 finetune every step is a consistent jump toward the data estimate.
    """
    if steps < 1 or phases < 1:
        raise ValueError(f"phased_grid: steps and phases must be >= 1, got {steps}, {phases}")
    if steps <= phases:
        starts = np.floor(np.linspace(0, phases, steps, endpoint=False)) / phases
        return torch.tensor([*starts, 1.0], dtype=torch.float64)
    base, extra = divmod(steps, phases)
    points = [0.0]
    for p in range(phases):
        parts = base + (p < extra)
        points += [(p + (i + 1) / parts) / phases for i in range(parts)]
    points[-1] = 1.0
    return torch.tensor(points, dtype=torch.float64)


def turbo_grid(steps: int) -> torch.Tensor:
    """[steps + 1] float64 times of the released turbo scheduler (5 steps: 0, 0.1992, 0.3994, 0.5996, 0.7998,
    1), so an exported student samples in fvdm exactly as in the public Hunyuan3D-2 turbo pipeline."""
    if steps < 1:
        raise ValueError(f"turbo_grid: steps must be >= 1, got {steps}")
    table = np.linspace(0, 1, TURBO_TRAIN_TIMESTEPS)
    r = TURBO_TRAIN_TIMESTEPS // TURBO_PCM_TIMESTEPS
    index = [0] + [m * r - 1 for m in range(1, TURBO_PCM_TIMESTEPS)]
    picks = np.floor(np.linspace(0, TURBO_PCM_TIMESTEPS, steps, endpoint=False)).astype(int)
    return torch.tensor([*table[np.asarray(index)[picks]], 1.0], dtype=torch.float64)
