"""Dense volume decoding: query the VAE at every point of the (R+1)^3 grid, in chunks (the baseline decoder)."""
from __future__ import annotations

import torch

from fvdm.decoding.grid import Bounds, Box, DecodedField, as_box, check_resolution, grid_points, num_grid_points

DEFAULT_CHUNK = 1 << 18  # query points per vae.query call, summed over the batch


def query_chunked(vae, tokens: torch.Tensor, points: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``vae.query`` over points [B, P, 3], about ``chunk_size`` points per call (summed over B) -> [B, P] float32."""
    if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] != tokens.shape[0]:
        raise ValueError(f"query_chunked: points must be [B, P, 3] with B = {tokens.shape[0]}; "
                         f"got {tuple(points.shape)}")
    per_shape = max(1, chunk_size // tokens.shape[0])
    out = [vae.query(tokens, points[:, s:s + per_shape]).float() for s in range(0, points.shape[1], per_shape)]
    return torch.cat(out, dim=1) if out else points.new_zeros(points.shape[:2])


class DenseVolumeDecoder:
    """Queries all (R+1)^3 grid points of every shape; ``chunk_size`` points per call, summed over the batch."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK):
        if chunk_size < 1:
            raise ValueError(f"DenseVolumeDecoder: chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    @torch.no_grad()
    def __call__(self, vae, tokens: torch.Tensor, resolution: int, bounds: Bounds | Box) -> DecodedField:
        box, n = as_box(bounds), check_resolution(resolution) + 1
        b, total = tokens.shape[0], num_grid_points(resolution)
        per_shape = max(1, self.chunk_size // b)
        sdf = torch.empty(b, total, dtype=torch.float32, device=tokens.device)  # [B, (R+1)^3], x slowest
        for start in range(0, total, per_shape):
            flat = torch.arange(start, min(start + per_shape, total), device=tokens.device)
            pts = grid_points(flat, resolution, box).unsqueeze(0).expand(b, -1, -1)  # [B, chunk, 3]
            sdf[:, start:start + len(flat)] = vae.query(tokens, pts).float()
        return DecodedField(sdf=sdf.view(b, n, n, n), queries=[total] * b, resolution=n - 1, box=box)
