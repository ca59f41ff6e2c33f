"""The flow-matching convention, owned here so every stage and sampler agrees (Hunyuan3D-2's, so that
released checkpoints and samplers carry over).

- t in [0, 1]; t = 0 is pure noise, t = 1 is data.
- x_t = t * x1 + (1 - t) * eps, with x1 the (scaled) data latents and eps ~ N(0, I).
- The model predicts the velocity dx_t/dt = x1 - eps.
- An Euler step from t to t' is x_t' = x_t + (t' - t) * v; sampling runs t upward from 0 to 1.
- Implied data estimate x1_hat = x_t + (1 - t) * v.
- A timestep shift s is defined on the noise level sigma = 1 - t (SD3's sense: s > 1 spends more time
  near noise): sigma' = s * sigma / (1 + (s - 1) * sigma). Hunyuan's scheduler applies the same formula to
  t instead, which moves points the other way; released configs use s = 1, where both agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def _per_sample(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] time as a tensor broadcastable against x [B, ...]."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    return t.view(-1, *([1] * (x.dim() - 1))) if t.dim() else t


def interpolate(x1: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t x1 + (1 - t) eps, with t [B] broadcast over the remaining dims of x1 [B, ...]."""
    t = _per_sample(t, x1)
    return t * x1 + (1 - t) * eps


def velocity_target(x1: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target of flow matching: x1 - eps."""
    return x1 - eps


def euler_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float) -> torch.Tensor:
    """x + (t_next - t) v; times scalars or [B]."""
    return x + (_per_sample(t_next, x) - _per_sample(t, x)) * v


def data_estimate(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x1_hat = x_t + (1 - t) v: where an Euler step from t lands at t = 1."""
    return x + (1 - _per_sample(t, x)) * v


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift the noise level sigma = 1 - t by ``shift`` (s > 1 spends more steps near noise)."""
    if shift == 1.0:
        return t
    sigma = 1 - t
    return 1 - shift * sigma / (1 + (shift - 1) * sigma)


@dataclass
class TimestepSampling:
    """How training draws t: ``uniform`` on [0, 1) or ``logit_normal`` (t = sigmoid(N(mean, std))), then shifted."""

    kind: str = "uniform"  # uniform | logit_normal
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0  # on the noise level; 1 = none (every released Hunyuan3D-2 config)

    def validate(self) -> None:
        if self.kind not in ("uniform", "logit_normal"):
            raise ValueError(f"timesteps.kind: unknown '{self.kind}' (uniform or logit_normal)")
        if self.std <= 0 or self.shift <= 0:
            raise ValueError("timesteps.std and timesteps.shift must be > 0")


def sample_timesteps(n: int, cfg: TimestepSampling, device: torch.device | str = "cpu",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[n] training times in [0, 1] drawn as ``cfg`` says (fp32)."""
    if cfg.kind == "uniform":
        t = torch.rand(n, device=device, generator=generator)
    elif cfg.kind == "logit_normal":
        t = torch.sigmoid(cfg.mean + cfg.std * torch.randn(n, device=device, generator=generator))
    else:
        raise ValueError(f"timesteps.kind: unknown '{cfg.kind}' (uniform or logit_normal)")
    return shift_time(t, cfg.shift)


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """[steps + 1] float64 sampling times from 0 (noise) to 1 (data): ``steps`` Euler intervals, ``steps`` model
    evaluations (the released base pipeline evaluates once more at t = 1 and discards it)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift)
