"""``FlowDiT``: the flow-matching DiT of Hunyuan3D-2 (a Flux-style MMDiT without positional encoding).

latents x [B, N, in_channels], time t [B] (0 = noise, 1 = data), condition cond [B, L, context_in_dim]
--> velocity [B, N, in_channels].

Layout: ``depth`` double-stream blocks (latent and condition tokens keep their own weights and attend jointly,
condition tokens first), then ``depth_single_blocks`` single-stream blocks over [cond | latent], then an adaLN
output layer on the latent tokens. Every block is modulated by ``vec`` = MLP(timestep embedding) (+ the guidance
embedding in distilled models). Module names equal the released checkpoint keys (after stripping ``model.``),
so released state dicts load with ``strict=True``. Black Forest Labs' Flux (Apache-2.0) uses the same blocks.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from fvdm.models.attention import merge_heads

TIME_EMBED_DIM = 256  # width of the sinusoidal timestep (and guidance) embedding
NORM_EPS = 1e-6  # every LayerNorm and RMSNorm of the DiT


@dataclass
class DiTConfig:
    """Every architecture knob of the DiT, named like the released config's ``model.params``.
    Defaults are the ``tiny`` preset; see ``dit_preset``."""

    in_channels: int = 32  # latent channels (the output has the same)
    context_in_dim: int = 64  # condition token channels (e.g. image encoder features)
    hidden_size: int = 128
    num_heads: int = 4
    depth: int = 2  # double-stream blocks
    depth_single_blocks: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # bias of the double blocks' qkv projections (single blocks always have one)
    guidance_embed: bool = False  # guidance-distilled model: the CFG scale is an input

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the values cannot build a model."""
        for name in ("in_channels", "context_in_dim", "hidden_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("depth", "depth_single_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"DiTConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.num_heads: hidden_size {self.hidden_size} is not divisible by "
                             f"{self.num_heads} heads")
        if int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(f"DiTConfig.mlp_ratio: hidden_size * mlp_ratio must be >= 1, got {self.mlp_ratio}")


_PRESETS = {
    "tiny": dict(),  # the dataclass defaults: trains on 2 CPU cores
    # Hunyuan3D-2mini sizes
    "mini": dict(in_channels=64, context_in_dim=1536, hidden_size=1024, num_heads=16, depth=8, depth_single_blocks=16),
    # Hunyuan3D-2 v2-0 sizes
    "large": dict(in_channels=64, context_in_dim=1536, hidden_size=1024, num_heads=16, depth=16,
                  depth_single_blocks=32),
}


def dit_preset(name: str) -> DiTConfig:
    """``tiny`` | ``mini`` (Hunyuan3D-2mini sizes) | ``large`` (Hunyuan3D-2 v2-0 sizes)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown DiT preset '{name}' (choose from {', '.join(_PRESETS)})")
    return DiTConfig(**_PRESETS[name])


def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10000,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """t [B] -> [B, dim] float32: [cos(a), sin(a)] with a_i = time_factor * t * max_period^(-i / (dim/2)).

    Computed in fp32 whatever the input dtype (a half-precision phase of 1000 * t would be far off);
    the caller casts the result to its weights' dtype.
    """
    if dim % 2:
        raise ValueError(f"timestep_embedding: dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LN(x) + shift, LayerNorm without affine parameters; shift/scale [B, 1, W] or [B, W]."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) + shift


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: lifts the sinusoidal embedding to ``hidden``."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned ``scale``; the statistics run in fp32."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + NORM_EPS)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    """RMS norm of queries and keys over the head dim (stabilises the attention logits)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed q and k, cast to v's dtype (the fp32 scale would otherwise promote them)."""
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


def qkv_heads(qkv: torch.Tensor, heads: int, norm: QKNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused [B, L, 3 * H * D] grouped [q | k | v] -> q, k, v each [B, H, L, D], with q and k normed."""
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, L, D]
    q, k = norm(q, k, v)
    return q, k, v


class ModulationOut(NamedTuple):
    shift: torch.Tensor  # [B, 1, W]
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """vec [B, W] -> one (double: two) (shift, scale, gate) set(s), each [B, 1, W] to broadcast over tokens."""

    def __init__(self, hidden: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(hidden, self.multiplier * hidden)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, ...]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return tuple(ModulationOut(*chunks[i:i + 3]) for i in range(0, self.multiplier, 3))


class SelfAttention(nn.Module):
    """The weights of one stream's attention in a double block; the attention itself is joint, in the block."""

    def __init__(self, hidden: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, W] -> q, k, v each [B, H, L, D]."""
        return qkv_heads(self.qkv(x), self.heads, self.norm)


def mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    """Linear -> GELU (tanh) -> Linear, as a Sequential so the keys are ``0`` and ``2``."""
    return nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))


class DoubleStreamBlock(nn.Module):
    """Latent (``img``) and condition (``txt``) streams with separate weights and one joint attention."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.img_mod = Modulation(hidden, double=True)
        self.img_attn = SelfAttention(hidden, heads, qkv_bias)
        self.img_mlp = mlp(hidden, mlp_hidden)
        self.txt_mod = Modulation(hidden, double=True)
        self.txt_attn = SelfAttention(hidden, heads, qkv_bias)
        self.txt_mlp = mlp(hidden, mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor,
                vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, N, W], txt [B, L, W], vec [B, W] -> updated (img, txt)."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_mod1.shift, img_mod1.scale))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_mod1.shift, txt_mod1.scale))
        attn = merge_heads(F.scaled_dot_product_attention(  # condition tokens first: [B, L + N, W]
            torch.cat([txt_q, img_q], dim=2), torch.cat([txt_k, img_k], dim=2), torch.cat([txt_v, img_v], dim=2)))
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(modulate(img, img_mod2.shift, img_mod2.scale))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(modulate(txt, txt_mod2.shift, txt_mod2.scale))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream, attention and MLP in parallel: ``linear1`` makes qkv and the MLP input, ``linear2`` merges."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.hidden = hidden
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """x [B, L, W], vec [B, W] -> [B, L, W]."""
        (mod,) = self.modulation(vec)
        qkv, mlp_in = self.linear1(modulate(x, mod.shift, mod.scale)).split(
            [3 * self.hidden, self.mlp_hidden], dim=-1)
        attn = merge_heads(F.scaled_dot_product_attention(*qkv_heads(qkv, self.heads, self.norm)))  # [B, L, W]
        out = self.linear2(torch.cat([attn, F.gelu(mlp_in, approximate="tanh")], dim=-1))
        return x + mod.gate * out


class LastLayer(nn.Module):
    """adaLN (shift, scale from vec) then a projection to the latent channels."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """x [B, N, W], vec [B, W] -> [B, N, out_channels]."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # each [B, 1, W]
        return self.linear(modulate(x, shift, scale))


class FlowDiT(nn.Module):
    """Velocity model v(x, t, cond[, guidance]) for rectified flow on VAE latents (see the module docstring)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        h = cfg.hidden_size
        self.latent_in = nn.Linear(cfg.in_channels, h)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, h)
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, h) if cfg.guidance_embed else None
        self.cond_in = nn.Linear(cfg.context_in_dim, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias)
                                           for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio)
                                           for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(h, cfg.in_channels)
        self.checkpoint_blocks = False  # recompute each block in the backward pass (activation checkpointing)

    def _block(self, block: nn.Module, *args: torch.Tensor) -> Any:
        """``block(*args)``, under activation checkpointing when ``checkpoint_blocks`` is set and gradients flow."""
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def compile_blocks(self) -> None:
        """``torch.compile`` every block in place (state dict keys unchanged): fuses the elementwise work between
        the matrix products (modulation, norms, activations), which eager mode runs as separate kernels."""
        for block in [*self.double_blocks, *self.single_blocks]:
            block.compile()

    def add_guidance_embedding(self) -> None:
        """Turn a teacher into a guidance-distillation student: add ``guidance_in`` with a zero output layer.

        The student then starts as exactly the teacher for every guidance value, and training moves it from
        there. The released models give no initialisation for this; the zero init is fvdm's choice.
        """
        if self.guidance_in is not None:
            raise RuntimeError("add_guidance_embedding: this model already has a guidance embedding")
        ref = self.time_in.in_layer.weight
        guidance_in = MLPEmbedder(TIME_EMBED_DIM, self.cfg.hidden_size).to(device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(guidance_in.out_layer.weight)
        nn.init.zeros_(guidance_in.out_layer.bias)
        self.guidance_in = guidance_in
        self.cfg = dataclasses.replace(self.cfg, guidance_embed=True)

    def modulation_vector(self, t: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """``vec`` [B, hidden] that modulates every block, from t [B] and (distilled models) guidance [B]."""
        if self.guidance_in is not None and guidance is None:
            raise ValueError("this DiT has a guidance embedding (guidance_embed=True): pass guidance [B]")
        if self.guidance_in is None and guidance is not None:
            raise ValueError("this DiT has no guidance embedding (guidance_embed=False): guidance must be None")
        dtype = self.time_in.in_layer.weight.dtype
        vec = self.time_in(timestep_embedding(t).to(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        return vec

    def _trunk(self, latent: torch.Tensor, cond: torch.Tensor,
               vec: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Run the blocks on the projected tokens latent [B, N, hidden] and cond [B, L, hidden], yielding
        (tap name, latent-token features [B, N, hidden]) after each block."""
        for i, block in enumerate(self.double_blocks):
            latent, cond = self._block(block, latent, cond, vec)
            yield f"double.{i}", latent
        num_cond = cond.shape[1]
        seq = torch.cat([cond, latent], dim=1)  # [B, L + N, hidden]
        for j, block in enumerate(self.single_blocks):
            seq = self._block(block, seq, vec)
            yield f"single.{j}", seq[:, num_cond:]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, in_channels], t [B], cond [B, L, context_in_dim], guidance [B] or None -> velocity like x."""
        vec = self.modulation_vector(t, guidance)
        latent = self.latent_in(x)
        for _, latent in self._trunk(latent, self.cond_in(cond), vec):
            pass  # run every block; the last features feed the output layer
        return self.final_layer(latent, vec)

    def features(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, layers: Sequence[str],
                 guidance: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Latent-token features [B, N, hidden] at the taps ``layers`` ("double.i", "single.j"), in order.

        Runs only as far as the deepest tap (e.g. for representation alignment or distillation losses).
        """
        valid = [f"double.{i}" for i in range(self.cfg.depth)]
        valid += [f"single.{j}" for j in range(self.cfg.depth_single_blocks)]
        if not layers:
            raise ValueError("features: name at least one layer")
        for name in layers:
            if name not in valid:
                raise ValueError(f"features: unknown layer '{name}' (use double.0..double.{self.cfg.depth - 1} "
                                 f"or single.0..single.{self.cfg.depth_single_blocks - 1})")
        wanted = set(layers)
        found = {}
        vec = self.modulation_vector(t, guidance)
        for name, feats in self._trunk(self.latent_in(x), self.cond_in(cond), vec):
            if name in wanted:
                found[name] = feats
                if len(found) == len(wanted):
                    break
        return [found[name] for name in layers]
