"""Sample counts and the SDF sampling shared by the procedural set (``synth``) and real meshes (``prepare``).

Both sources provide surface points with normals, sharp-edge points and a signed-distance function
(negative inside); this module turns them into the volume and near-surface SDF samples of a shard sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

SDFFn = Callable[[np.ndarray], np.ndarray]  # [P, 3] float -> [P] signed distance, negative inside


@dataclass
class SampleCounts:
    """Per-shape sample counts. Defaults are sized for real training; tests pass small ones."""

    surface: int = 100_000
    sharp: int = 25_000
    vol: int = 250_000
    near: int = 250_000  # split evenly over near_sigmas, then a sharp-edge share
    near_sigmas: tuple[float, ...] = (0.005, 0.05)  # two noise scales, as in the Hunyuan3D-2.1 data tools
    sharp_near_fraction: float = 0.2  # share of near samples drawn around sharp edges (when any)
    sharp_sigma: float = 0.01
    renders: int = 4
    render_size: int = 256
    margin: float = 0.05  # the shape's bounding box fits [-(1 - margin), 1 - margin]^3


def near_points(surface: np.ndarray, sharp: np.ndarray, counts: SampleCounts, rng: np.random.Generator) -> np.ndarray:
    """[Nn, 3] surface points perturbed at each noise scale, plus points around sharp edges."""
    n_sharp = int(counts.near * counts.sharp_near_fraction) if len(sharp) else 0
    n_rest = counts.near - n_sharp
    per = np.full(len(counts.near_sigmas), n_rest // len(counts.near_sigmas))
    per[: n_rest - per.sum()] += 1
    parts = []
    for n, sigma in zip(per, counts.near_sigmas):
        base = surface[rng.integers(0, len(surface), n), :3]
        parts.append(base + rng.normal(0.0, sigma, size=base.shape))
    if n_sharp:
        base = sharp[rng.integers(0, len(sharp), n_sharp), :3]
        parts.append(base + rng.normal(0.0, counts.sharp_sigma, size=base.shape))
    return np.clip(np.concatenate(parts), -1.0, 1.0)


def sdf_samples(
    surface: np.ndarray, sharp: np.ndarray, sdf: SDFFn, counts: SampleCounts, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Volume ([Nv, 4], uniform in [-1, 1]^3) and near-surface ([Nn, 4]) points with their SDF."""
    vol = rng.uniform(-1.0, 1.0, size=(counts.vol, 3))
    near = near_points(surface, sharp, counts, rng)
    values = sdf(np.concatenate([vol, near]))
    vol4 = np.concatenate([vol, values[: len(vol), None]], axis=1).astype(np.float32)
    near4 = np.concatenate([near, values[len(vol) :, None]], axis=1).astype(np.float32)
    return vol4, near4
