"""Fourier embedding of 3-D points, always computed in fp32.

Frequencies reach 2^(F-1) (128 rad per unit at F = 8), so a half-precision phase would be off by ~0.1 rad;
the embedding therefore runs with autocast disabled and the frequencies are built on the fly, never stored
as a buffer that a ``.half()`` cast could round.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region that runs in the tensors' own dtype even inside an autocast context (no-op on meta).

    Decided on the device type alone: ``torch.amp.is_autocast_available`` is opaque to torch.compile (torch 2.11
    on CUDA broke the graph there and recompiled the rest of the embedding until its recompile limit).
    """
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


class FourierEmbedder(nn.Module):
    """x -> [x, sin(x * f), cos(x * f)] with f = 2^0 .. 2^(F-1) (times pi if ``include_pi``).

    The sin and cos blocks are input-dimension major (x0*f0 .. x0*f_{F-1}, x1*f0, ...), the order the
    released Hunyuan3D-2 checkpoints were trained with. Output width: input_dim * (2F + 1).
    """

    def __init__(self, num_freqs: int, include_pi: bool, input_dim: int = 3):
        super().__init__()
        self.num_freqs = num_freqs
        self.include_pi = include_pi
        self.input_dim = input_dim

    @property
    def out_dim(self) -> int:
        return self.input_dim * (2 * self.num_freqs + 1)

    def frequencies(self, device: torch.device) -> torch.Tensor:
        freqs = torch.pow(2.0, torch.arange(self.num_freqs, dtype=torch.float32, device=device))  # exact powers of 2
        return freqs * math.pi if self.include_pi else freqs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., input_dim] -> [..., out_dim] float32, whatever the input dtype or autocast state."""
        with autocast_off(x.device):
            x = x.float()
            phase = (x[..., None] * self.frequencies(x.device)).flatten(-2)  # [..., D, F] -> [..., D*F]
            return torch.cat([x, phase.sin(), phase.cos()], dim=-1)
