"""The decoding grid: (R+1)^3 points over a box, the exact index <-> world mapping, and a decoded field.

A grid of resolution R has R cells and R+1 points per axis. Point ``i`` on an axis lies at
``i / R * (box_max - box_min) + box_min``; the same formula maps marching-cubes vertices (fractional
indices) back to the world, so the mesh sits exactly where the field was sampled. (The reference code
divides by R+1 there, which shrinks and shifts the mesh by up to one voxel; fvdm does not.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

DEFAULT_BOUNDS = (-1.01, 1.01)  # the reference decoders' box: a little larger than the [-1, 1] data cube

Bounds = float | Sequence[float]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box: ``lo`` and ``hi`` are (x, y, z) corners with lo < hi on every axis."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    @property
    def size(self) -> tuple[float, float, float]:
        return tuple(h - l for l, h in zip(self.lo, self.hi))


def as_box(bounds: Bounds | Box) -> Box:
    """A Box from ``b`` (the cube [-b, b]^3), ``(lo, hi)`` (the cube [lo, hi]^3) or ``(x0, y0, z0, x1, y1, z1)``."""
    if isinstance(bounds, Box):
        return bounds
    if isinstance(bounds, (int, float)):
        lo, hi = (-float(bounds),) * 3, (float(bounds),) * 3
    else:
        b = [float(v) for v in bounds]
        if len(b) == 2:
            lo, hi = (b[0],) * 3, (b[1],) * 3
        elif len(b) == 6:
            lo, hi = tuple(b[:3]), tuple(b[3:])
        else:
            raise ValueError(f"bounds must be a number, (lo, hi) or (x0, y0, z0, x1, y1, z1); got {bounds!r}")
    if not all(np.isfinite(lo + hi)) or not all(l < h for l, h in zip(lo, hi)):
        raise ValueError(f"bounds must be finite with min < max on every axis; got {bounds!r}")
    return Box(lo, hi)


def check_resolution(resolution: int) -> int:
    """``resolution`` as an int >= 1 (number of cells per axis), else ValueError."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be an integer >= 1 (cells per axis); got {resolution!r}")
    return int(resolution)


def index_to_world(index: np.ndarray, resolution: int, bounds: Bounds | Box) -> np.ndarray:
    """Grid indices [..., 3] (integer or fractional, e.g. marching-cubes vertices) -> world coordinates, float64."""
    box = as_box(bounds)
    lo, size = np.asarray(box.lo), np.asarray(box.size)
    return np.asarray(index, dtype=np.float64) / check_resolution(resolution) * size + lo


def grid_points(flat_index: torch.Tensor, resolution: int, bounds: Bounds | Box) -> torch.Tensor:
    """World coordinates [P, 3] (float32) of flat indices [P] into the C-ordered (R+1)^3 grid (x slowest)."""
    box = as_box(bounds)
    n = check_resolution(resolution) + 1
    ijk = torch.stack([flat_index // (n * n), (flat_index // n) % n, flat_index % n], dim=-1)  # [P, 3]
    lo = torch.tensor(box.lo, dtype=torch.float64, device=flat_index.device)
    size = torch.tensor(box.size, dtype=torch.float64, device=flat_index.device)
    return (ijk.double() / resolution * size + lo).float()


def num_grid_points(resolution: int) -> int:
    """(R+1)^3."""
    return (check_resolution(resolution) + 1) ** 3


@dataclass
class DecodedField:
    """What a volume decoder returns: the SDF on the full grid and how many points it actually queried.

    ``sdf`` is [B, R+1, R+1, R+1] float32, indexed [b, x, y, z], negative inside, finite everywhere
    (a decoder that skips points fills them with a value of the right sign). ``queries`` holds, per
    shape, the number of points sent to ``vae.query``.
    """

    sdf: torch.Tensor
    queries: list[int]
    resolution: int
    box: Box


class VolumeDecoder(Protocol):
    """Latent tokens -> :class:`DecodedField` on the (R+1)^3 grid over ``bounds`` (dense or hierarchical)."""

    def __call__(self, vae, tokens: torch.Tensor, resolution: int, bounds: Bounds | Box) -> DecodedField: ...
