"""Euler sampling of a flow DiT with classifier-free guidance (convention: ``fvdm.flow``).

A model with a guidance embedding takes w as an input and runs once per step; one without runs on a
doubled batch [cond ; uncond] and mixes v = v_u + w (v_c - v_u). ``steps`` Euler intervals cost exactly
``steps`` evaluations (the released base pipeline spends one more, at t = 1, and discards it).
"""
from __future__ import annotations

from typing import Optional

import torch

from fvdm.flow import euler_step, time_grid


def guided_velocity(dit: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    uncond: Optional[torch.Tensor], guidance: float | torch.Tensor) -> torch.Tensor:
    """The velocity at guidance ``w`` (scalar or [B]): one pass through the embedding, or CFG over a doubled batch.
    With no guidance embedding and ``uncond`` None the model runs once, conditionally (w ignored)."""
    b = x.shape[0]
    w = torch.as_tensor(guidance, dtype=torch.float32, device=x.device).expand(b)
    if dit.cfg.guidance_embed:
        return dit(x, t, cond, guidance=w)
    if uncond is None:
        return dit(x, t, cond)
    v_c, v_u = dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)  # each [B, N, C]
    return v_u + w.view(-1, 1, 1).to(v_c.dtype) * (v_c - v_u)


@torch.no_grad()
def euler_sample(dit: torch.nn.Module, noise: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                 steps: int = 50, guidance: float = 5.0, shift: float = 1.0,
                 grid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integrate from ``noise`` [B, N, C] at t = 0 to data latents at t = 1 in ``steps`` guided Euler steps
    on the uniform (shifted) grid, or on ``grid`` (times from 0 to 1, e.g. ``fvdm.consistency.phased_grid``)."""
    grid = time_grid(steps, shift) if grid is None else grid
    x = noise
    for i in range(len(grid) - 1):
        t = torch.full((x.shape[0],), float(grid[i]), device=x.device)
        v = guided_velocity(dit, x, t, cond, uncond, guidance)
        x = euler_step(x, v.to(x.dtype), float(grid[i]), float(grid[i + 1]))
    return x
