"""Latent discriminator (paper 3.3, adversarial finetuning): token features of chosen blocks of a frozen,
pretrained DiT, each scored by its own small trainable head.

D(x) = the per-token logits head_l(F_l(x; t = 1, cond)) of every tap l, where F_l are the latent-token features of
``dit.features`` (``double.i`` / ``single.j``). Clean latents sit at the data end of the flow, so the backbone
is given t = ``backbone_time`` = 1 (the paper leaves this open; our choice). Gradients flow through the frozen
backbone into the input (the generator's sample) but never into the backbone's weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fvdm.models.dit import FlowDiT


@dataclass
class DiscriminatorConfig:
    layers: list[str] = field(default_factory=lambda: ["double.1", "single.1"])  # backbone taps, one head each
    groups: int = 32  # GroupNorm groups of the heads (must divide the backbone width)
    negative_slope: float = 0.2  # LeakyReLU
    backbone_time: float = 1.0  # t given to the backbone for clean latents


class TokenHead(nn.Module):
    """Per-token MLP: Linear -> GroupNorm -> LeakyReLU, a second such block with a residual, Linear -> 1."""

    def __init__(self, width: int, groups: int, negative_slope: float):
        super().__init__()
        if width % groups:
            raise ValueError(f"discriminator.groups: {groups} does not divide the backbone width {width}")
        self.fc1, self.norm1 = nn.Linear(width, width), nn.GroupNorm(groups, width)
        self.fc2, self.norm2 = nn.Linear(width, width), nn.GroupNorm(groups, width)
        self.out = nn.Linear(width, 1)
        self.slope = negative_slope

    def block(self, x: torch.Tensor, fc: nn.Linear, norm: nn.GroupNorm) -> torch.Tensor:
        """[B, N, W] -> [B, N, W]; GroupNorm over (channels of a group, all tokens)."""
        return F.leaky_relu(norm(fc(x).transpose(1, 2)).transpose(1, 2), self.slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, N, W] -> logits [B, N]."""
        h = self.block(x, self.fc1, self.norm1)
        h = h + self.block(h, self.fc2, self.norm2)
        return self.out(h).squeeze(-1)


class LatentDiscriminator(nn.Module):
    """Heads over a frozen backbone's features. The backbone (the stage's teacher) is referenced, not
    registered: parameters, state dict and ``.to`` cover the heads alone, and the backbone is not copied."""

    def __init__(self, backbone: FlowDiT, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        object.__setattr__(self, "backbone", backbone.requires_grad_(False).eval())
        width = backbone.cfg.hidden_size
        self.heads = nn.ModuleList(TokenHead(width, cfg.groups, cfg.negative_slope) for _ in cfg.layers)

    def features(self, latents: torch.Tensor, cond: torch.Tensor, guidance: float) -> list[torch.Tensor]:
        """The backbone's latent-token features [B, N, W] at every tap for DiT-space latents [B, N, C] under
        condition tokens [B, L, D]; gradients reach ``latents``, never the backbone."""
        b = latents.shape[0]
        t = torch.full((b,), self.cfg.backbone_time, device=latents.device)
        w = torch.full((b,), guidance, device=latents.device) if self.backbone.cfg.guidance_embed else None
        return self.backbone.features(latents, t, cond, self.cfg.layers, guidance=w)

    def score(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Per-token logits [B, taps * N] of every head on its tap's features; hinge losses average over all of
        them (as PCM does over heads and positions)."""
        return torch.cat([head(f.float()) for head, f in zip(self.heads, features)], dim=1)

    def forward(self, latents: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        """D(latents): ``score(features(...))``, logits [B, taps * N]."""
        return self.score(self.features(latents, cond, guidance))
