"""The decoding grid: (R+1)^3 points over a box, the exact index <-> world mapping, and a decoded field.

A grid of resolution R has R cells and R+1 points per axis. Point ``i`` on an axis lies at
``i / R * (box_max - box_min) + box_min``; the same formula maps marching-cubes vertices (fractional
indices) back to the world, so the mesh sits exactly where the field was sampled. (The reference code
divides by R+1 there, which shrinks and shifts the mesh by up to one voxel; fvdm does not.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    n = check_resolution(resolution) + 1
    ijk = torch.stack([flat_index // (n * n), (flat_index // n) % n, flat_index % n], dim=-1)  # [P, 3]
    return index_points(ijk, resolution, bounds)


def index_points(ijk: torch.Tensor, resolution: int, bounds: Bounds | Box) -> torch.Tensor:
    """World coordinates [P, 3] (float32, computed in float64) of integer grid indices [P, 3]."""
    box = as_box(bounds)
    lo = torch.tensor(box.lo, dtype=torch.float64, device=ijk.device)
    size = torch.tensor(box.size, dtype=torch.float64, device=ijk.device)
    return (ijk.double() / check_resolution(resolution) * size + lo).float()


def num_grid_points(resolution: int) -> int:
    """(R+1)^3."""
    return (check_resolution(resolution) + 1) ** 3


@dataclass
class LevelStats:
    """One level of a decode: its resolution, the points queried per shape, and the batch's wall time."""

    resolution: int
    queries: list[int]
    seconds: float


@dataclass
class DecodedField:
    """What a volume decoder returns: the SDF on the full grid and how many points it actually queried.

    ``sdf`` is [B, R+1, R+1, R+1] float32, indexed [b, x, y, z], negative inside, finite everywhere
    (a decoder that skips points fills them with a value of the right sign). ``queries`` holds, per
    shape, the number of points sent to ``vae.query``; ``levels`` the same per cascade level (if any).
    """

    sdf: torch.Tensor
    queries: list[int]
    resolution: int
    box: Box
    levels: list[LevelStats] = field(default_factory=list)

    def values_at(self, ijk: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Grid values [P] at integer indices ijk [P, 3] of shapes ``batch`` [P]."""
        return self.sdf[batch, ijk[:, 0], ijk[:, 1], ijk[:, 2]]


class GridField(Protocol):
    """A decoded grid, dense or sparse, that can be read at integer grid points."""

    resolution: int
    box: Box

    def values_at(self, ijk: torch.Tensor, batch: torch.Tensor) -> torch.Tensor: ...


def sample_field(decoded: GridField, points: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of a decoded grid at world points [B, P, 3] -> [B, P] float32 (clamped to the box).

    What the decoded volume (and so its marching-cubes mesh) says at points off the grid: used to score
    decoders by V-IoU / S-IoU on held-out SDF samples.
    """
    b, p, _ = points.shape
    r = decoded.resolution
    lo = torch.tensor(decoded.box.lo, dtype=torch.float64, device=points.device)
    size = torch.tensor(decoded.box.size, dtype=torch.float64, device=points.device)
    u = ((points.double() - lo) / size * r).clamp(0, r).reshape(-1, 3)  # [B*P, 3] fractional grid index
    base = u.floor().long().clamp(max=r - 1)
    t = (u - base).float()  # [B*P, 3] in [0, 1]
    batch = torch.arange(b, device=points.device).repeat_interleave(p)
    out = torch.zeros(b * p, dtype=torch.float32, device=points.device)
    for corner in range(8):
        offset = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], device=points.device)
        weight = torch.where(offset.bool(), t, 1 - t).prod(dim=1)
        out += weight * decoded.values_at(base + offset, batch).float()
    return out.view(b, p)


class VolumeDecoder(Protocol):
    """Latent tokens -> :class:`DecodedField` on the (R+1)^3 grid over ``bounds`` (dense or hierarchical).

    A decoder whose call also takes a ``level`` keyword (the hierarchical one, which must find the iso-surface
    while it refines) gets ``decode_mesh``'s level; it may return any :class:`GridField` its extractor reads.
    """

    def __call__(self, vae, tokens: torch.Tensor, resolution: int, bounds: Bounds | Box) -> DecodedField: ...
