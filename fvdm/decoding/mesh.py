"""``decode_mesh``: latents -> meshes, the one entry point every volume decoder and surface extractor plugs into.

Pipeline: ``vae.decode`` once, a volume decoder (dense by default) fills the SDF on the (R+1)^3 grid, then a
surface extractor (scikit-image marching cubes by default) takes the ``level`` set and maps vertices to the
world exactly (``fvdm.decoding.grid``). The SDF is negative inside, so faces are wound counter-clockwise seen
from outside (normals point towards positive values) and a closed mesh has positive volume.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import trimesh
from skimage.measure import marching_cubes

from fvdm.decoding.dense import DenseVolumeDecoder
from fvdm.decoding.grid import DEFAULT_BOUNDS, Bounds, Box, DecodedField, VolumeDecoder, as_box, index_to_world


class EmptyMeshWarning(UserWarning):
    """A decoded field had no surface (no sign change at the level, or not finite); its mesh is empty."""


@dataclass
class DecodeStats:
    """Cost of one mesh: the points it queried, and its share (batch total / B) of the wall time per stage."""

    queries: int
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)  # "decode" (vae.decode), "volume", "extract"


@dataclass
class Mesh:
    """A triangle mesh in world coordinates: vertices [V, 3] float32, faces [F, 3] int64 (outward winding)."""

    vertices: np.ndarray
    faces: np.ndarray
    stats: DecodeStats | None = None

    @classmethod
    def empty(cls) -> "Mesh":
        return cls(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))

    @property
    def is_empty(self) -> bool:
        return len(self.faces) == 0

    def to_trimesh(self) -> trimesh.Trimesh:
        """The same arrays as a trimesh (no merging or reordering)."""
        return trimesh.Trimesh(self.vertices, self.faces, process=False)


class SurfaceExtractor(Protocol):
    """A decoded field -> one Mesh per shape at ``level``, vertices in world coordinates."""

    def __call__(self, decoded: DecodedField, level: float) -> list[Mesh]: ...


def marching_cubes_skimage(decoded: DecodedField, level: float = 0.0) -> list[Mesh]:
    """scikit-image (Lewiner) marching cubes on the CPU, one shape at a time; empty Mesh + warning if no surface."""
    meshes = []
    for i, volume in enumerate(decoded.sdf.detach().float().cpu().numpy()):  # volume: [R+1, R+1, R+1]
        if not np.isfinite(volume).all():
            warnings.warn(f"decode_mesh: shape {i}: the field has non-finite values; returning an empty mesh",
                          EmptyMeshWarning, stacklevel=2)
            meshes.append(Mesh.empty())
            continue
        if not ((volume < level).any() and (volume > level).any()):
            where = "inside" if (volume <= level).all() else "outside"
            warnings.warn(f"decode_mesh: shape {i}: no surface at level {level} (every point is {where}); "
                          "returning an empty mesh", EmptyMeshWarning, stacklevel=2)
            meshes.append(Mesh.empty())
            continue
        # "descent": the object of interest is where values fall below the level (negative inside), which
        # winds faces counter-clockwise seen from outside.
        verts, faces, _, _ = marching_cubes(volume, level, gradient_direction="descent", allow_degenerate=False)
        world = index_to_world(verts, decoded.resolution, decoded.box).astype(np.float32)
        meshes.append(Mesh(world, faces.astype(np.int64)))
    return meshes


def _clock(device: torch.device) -> float:
    """Wall-clock seconds after the device's queued work has finished (synchronized on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def decode_mesh(vae, latents: torch.Tensor, resolution: int = 256, bounds: Bounds | Box = DEFAULT_BOUNDS,
                decoder: VolumeDecoder | None = None, level: float = 0.0,
                extractor: SurfaceExtractor | None = None) -> list[Mesh]:
    """Latents [B, N, C] -> B meshes of the ``level`` set, each with its :class:`DecodeStats`.

    ``decoder`` defaults to :class:`DenseVolumeDecoder`, ``extractor`` to scikit-image marching cubes.
    A shape without a surface gives an empty Mesh and an :class:`EmptyMeshWarning`, never an error.
    """
    if not isinstance(latents, torch.Tensor) or latents.ndim != 3 or latents.shape[0] == 0:
        raise ValueError(f"decode_mesh: latents must be a [B, N, C] tensor with B >= 1; "
                         f"got {getattr(latents, 'shape', type(latents))}")
    if not np.isfinite(level):
        raise ValueError(f"decode_mesh: level must be finite, got {level}")
    decoder = DenseVolumeDecoder() if decoder is None else decoder
    extractor = marching_cubes_skimage if extractor is None else extractor
    box = as_box(bounds)

    t0 = _clock(latents.device)
    tokens = vae.decode(latents)
    t1 = _clock(latents.device)
    decoded = decoder(vae, tokens, resolution, box)
    t2 = _clock(latents.device)
    meshes = extractor(decoded, level)
    t3 = _clock(latents.device)

    b = latents.shape[0]
    stages = {"decode": (t1 - t0) / b, "volume": (t2 - t1) / b, "extract": (t3 - t2) / b}
    for mesh, queries in zip(meshes, decoded.queries):
        mesh.stats = DecodeStats(queries=int(queries), seconds=(t3 - t0) / b, stages=dict(stages))
    return meshes
