"""Pre-norm transformer blocks over ``F.scaled_dot_product_attention``, with optional qk-norm.

Layout conventions (used by ``fvdm.interop.hunyuan3d`` to map released checkpoints):
- fused projections are grouped ``[q | k | v]`` (each block ``heads * head_dim`` rows, heads in order);
  released Hunyuan3D-2 files interleave per head ``[q_h | k_h | v_h]``, which the importer rearranges;
- LayerNorms inside blocks use eps 1e-6; qk-norm is a LayerNorm over the head dim, eps 1e-6, with affine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_LN_EPS = 1e-6  # every LayerNorm inside a block and the qk-norm


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads * D] -> [B, heads, N, D]."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, D] -> [B, N, heads * D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class MLP(nn.Module):
    """Linear(w, w*r) -> exact GELU -> Linear(w*r, w)."""

    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width * ratio)
        self.fc2 = nn.Linear(width * ratio, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def qk_norm_layer(head_dim: int, enabled: bool) -> nn.Module:
    """Per-head LayerNorm for queries or keys; identity when qk-norm is off."""
    return nn.LayerNorm(head_dim, eps=BLOCK_LN_EPS) if enabled else nn.Identity()


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection ([q | k | v] rows)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.q_norm = qk_norm_layer(width // heads, qk_norm)
        self.k_norm = qk_norm_layer(width // heads, qk_norm)
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))  # each [B, H, N, D]
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(merge_heads(out))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: ``q`` from the queries, fused ``kv`` ([k | v] rows) from the data.

    Split into ``queries`` / ``keys_values`` / ``output`` so a caller can compute k, v once and reuse them.
    """

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool, data_width: int | None = None):
        super().__init__()
        self.heads = heads
        self.q_norm = qk_norm_layer(width // heads, qk_norm)
        self.k_norm = qk_norm_layer(width // heads, qk_norm)
        self.q = nn.Linear(width, width, bias=qkv_bias)
        self.kv = nn.Linear(data_width or width, 2 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """[B, P, W] -> normed queries [B, H, P, D]."""
        return self.q_norm(split_heads(self.q(x), self.heads))

    def keys_values(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, W_data] -> normed keys, values, each [B, H, M, D]."""
        k, v = (split_heads(t, self.heads) for t in self.kv(data).chunk(2, dim=-1))
        return self.k_norm(k), v

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """SDPA result [B, H, P, D] -> [B, P, W]."""
        return self.proj(merge_heads(attended))


class SelfAttentionBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=BLOCK_LN_EPS)
        self.attn = SelfAttention(width, heads, qkv_bias, qk_norm)
        self.norm2 = nn.LayerNorm(width, eps=BLOCK_LN_EPS)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """x + attn(LN_q(x), LN_kv(data)), then x + MLP(LN_mlp(x)).

    ``forward(x, data) == finish(x, sdpa(queries(x), *keys_values(data)))``; the pieces are public so a
    decoder can cache the keys/values of one shape, or attend to a selected subset of them.
    """

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool, mlp_ratio: int = 4,
                 data_width: int | None = None):
        super().__init__()
        self.norm_q = nn.LayerNorm(width, eps=BLOCK_LN_EPS)
        self.norm_kv = nn.LayerNorm(data_width or width, eps=BLOCK_LN_EPS)
        self.attn = CrossAttention(width, heads, qkv_bias, qk_norm, data_width)
        self.norm_mlp = nn.LayerNorm(width, eps=BLOCK_LN_EPS)
        self.mlp = MLP(width, mlp_ratio)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """[B, P, W] -> [B, H, P, D]."""
        return self.attn.queries(self.norm_q(x))

    def keys_values(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, W_data] -> k, v each [B, H, M, D]."""
        return self.attn.keys_values(self.norm_kv(data))

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual + MLP given the SDPA result ``attended`` [B, H, P, D] for queries ``x`` [B, P, W]."""
        x = x + self.attn.output(attended)
        return x + self.mlp(self.norm_mlp(x))

    def forward(self, x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        k, v = self.keys_values(data)
        return self.finish(x, F.scaled_dot_product_attention(self.queries(x), k, v))
