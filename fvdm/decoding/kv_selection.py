"""Adaptive KV selection (FlashVDM algorithm 2) for the geo decoder's cross-attention, with query packing.

Queries that lie close together attend to similar latent tokens. So the query points of one shape are put in a
locality order (Morton / Z-order of their grid cells), cut into groups of at most ``group_size`` consecutive
points (on a dense grid these are near-cubic sub-volumes, on the surface band of a hierarchical level compact
surface patches), and in each group a few sampled queries score every key; the group then attends only to the
``topk`` best keys. All groups of a chunk are packed into one ``[G, H, S, D]`` tensor and go through ONE batched
``scaled_dot_product_attention`` call against their gathered ``[G, H, k, D]`` keys and values: no Python loop
over groups. Keys and values are computed once per shape (``geo_decoder.kv``).

Scoring (``mode``), all in fp32 with the attention's own 1/sqrt(D) scale:
- ``"softmax"`` (default): mean over the sampled queries of their attention probabilities, per head; each head
  keeps its own top-k keys.
- ``"logits"``: mean of the scaled logits over the sampled queries (= the mean query's logits), per head: what
  the public implementation does (there without the scale, in fp16).
- ``"union"``: the union of each sampled query's top-N keys by head-averaged probability (N = ``top_n``, paper:
  about 50, lowered to topk / samples if the union could not fit), shared by all heads and filled up to ``topk``
  by mean probability so that the packed tensor keeps a fixed size.
With ``topk`` = all tokens every mode reproduces exact attention (the keys are only permuted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fvdm.decoding.hierarchical import shape_segments
from fvdm.models.embedding import autocast_off

MODES = ("softmax", "logits", "union")
SCORE_BUDGET = 1 << 28  # fp32 scores held at once by the scoring step (1 GiB): chunks of ~100k+ queries on a GPU


@dataclass(frozen=True)
class KVSelection:
    """Settings of adaptive KV selection; defaults keep a third of the tokens (1024 of 3072) per group and head."""

    topk: int | float = 1 / 3  # keys kept: a count, or a fraction (0, 1] of the tokens
    group_size: int = 1024  # queries per group (a compact run of points in Morton order)
    samples: int = 16  # sampled queries per group that score the keys
    mode: str = "softmax"  # softmax | logits | union (see the module docstring)
    top_n: int = 50  # union mode: keys taken from each sampled query
    chunk_size: int = 1 << 18  # query slots per packed attention call (memory bound)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"KVSelection.mode: unknown mode '{self.mode}' (choose from {', '.join(MODES)})")
        count = isinstance(self.topk, int) and not isinstance(self.topk, bool) and self.topk >= 1
        if not (count or (isinstance(self.topk, float) and 0 < self.topk <= 1)):
            raise ValueError(f"KVSelection.topk: must be an int >= 1 or a float in (0, 1]; got {self.topk!r}")
        for name in ("group_size", "samples", "top_n", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVSelection.{name}: must be >= 1, got {getattr(self, name)}")

    def keys(self, num_tokens: int) -> int:
        """Keys kept per group out of ``num_tokens``."""
        k = self.topk if isinstance(self.topk, int) else max(1, round(self.topk * num_tokens))
        return min(k, num_tokens)


def _part1by2(x: Tensor) -> Tensor:
    """Spread the low 21 bits of x (int64) so that bit i lands on bit 3i."""
    x = x & 0x1FFFFF
    x = (x | x << 32) & 0x1F00000000FFFF
    x = (x | x << 16) & 0x1F0000FF0000FF
    x = (x | x << 8) & 0x100F00F00F00F00F
    x = (x | x << 4) & 0x10C30C30C30C30C3
    return (x | x << 2) & 0x1249249249249249


def morton_code(ijk: Tensor) -> Tensor:
    """Z-order codes [N] (int64) of non-negative integer coordinates [N, 3] below 2^21: sorting by them keeps
    points that are close in space mostly close in the order."""
    ijk = ijk.long()
    return (_part1by2(ijk[:, 0]) << 2) | (_part1by2(ijk[:, 1]) << 1) | _part1by2(ijk[:, 2])


def quantize(points: Tensor, bits: int = 10) -> Tensor:
    """Free points [N, 3] -> integer cells [N, 3] of a 2^bits grid over their bounding box (for ``morton_code``)."""
    lo, hi = points.amin(0), points.amax(0)
    scale = (2**bits - 1) / (hi - lo).clamp(min=1e-12)
    return ((points - lo) * scale).long().clamp(0, 2**bits - 1)


def adaptive_kv_selection(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, sel: KVSelection) -> Tensor:
    """Algorithm 2 on packed groups: sample, score, keep the top keys, attend.

    q [G, H, S, D]: the queries of G groups, rows >= counts[g] of group g are padding (they get an output that
    the caller discards); k, v [H, M, D]: one shape's keys and values. Returns the attention output [G, H, S, D].
    """
    g, h, s, d = q.shape
    m = k.shape[1]
    kept = sel.keys(m)
    n = min(sel.samples, s)
    # n sample rows spread evenly over each group's real rows
    rows = ((torch.arange(n, device=q.device) + 0.5) * counts[:, None] / n).long()  # [G, n]
    sampled = q.gather(2, rows[:, None, :, None].expand(g, h, n, d))  # [G, H, n, D]
    with autocast_off(q.device):
        keys_t = k.float().transpose(-1, -2)  # [H, D, M]
        # One bmm per head over all groups' sampled queries: broadcasting [G, H, n, D] @ [H, D, M] would copy the
        # keys once per group (a [G, H, D, M] tensor; a third of KV selection's time on an H100).
        if sel.mode == "logits":
            mean_q = sampled.float().mean(2).transpose(0, 1)  # [H, G, D]; the mean commutes with the product
            index = torch.bmm(mean_q, keys_t).transpose(0, 1).topk(kept, dim=-1).indices  # [G, H, kept]
        else:
            rows_q = sampled.float().transpose(0, 1).reshape(h, g * n, d)  # [H, G*n, D]
            logits = torch.bmm(rows_q, keys_t).view(h, g, n, m).transpose(0, 1)  # [G, H, n, M]
            probs = (logits / math.sqrt(d)).softmax(-1)  # [G, H, n, M]
            if sel.mode == "softmax":
                index = probs.mean(2).topk(kept, dim=-1).indices  # [G, H, kept]
            else:  # union of each sample's top-N keys (head-averaged), filled up by mean probability
                per_sample = probs.mean(1)  # [G, n, M]
                top_n = min(sel.top_n, max(1, kept // n))  # so that the union fits in the kept keys
                votes = torch.zeros(g, m, device=q.device)
                votes.scatter_add_(1, per_sample.topk(top_n, dim=-1).indices.flatten(1),
                                   torch.ones(g, n * top_n, device=q.device))
                index = (votes + per_sample.mean(1)).topk(kept, dim=-1).indices[:, None].expand(g, h, kept)
    flat = index + (torch.arange(h, device=q.device) * m)[None, :, None]  # [G, H, kept] rows of k.view(H*M, D)
    k_sel = k.reshape(h * m, d)[flat]  # [G, H, kept, D]
    v_sel = v.reshape(h * m, d)[flat]
    return F.scaled_dot_product_attention(q, k_sel, v_sel)


def selected_attend(geo_decoder, points: Tensor, k: Tensor, v: Tensor, sel: KVSelection) -> Tensor:
    """The geo decoder at points [P, 3] of ONE shape, given in locality order, attending with KV selection to its
    keys/values [H, M, D] -> [P] (float32).

    The points are cut into G = ceil(P / S) groups of S = min(group_size, P) consecutive points, the last group
    padded with copies of the last point, and processed a chunk of groups at a time. Every chunk is a contiguous
    slice of the padded points, so reading the queries and writing the outputs are plain slices (no masks, no
    host synchronization on the hot path).
    """
    p = points.shape[0]
    out = torch.empty(p, dtype=torch.float32, device=points.device)
    if p == 0:
        return out
    s = min(sel.group_size, p)
    g = -(-p // s)
    padded = torch.cat([points, points[-1:].expand(g * s - p, 3)])  # [G*S, 3]
    counts = torch.full((g,), s, dtype=torch.long, device=points.device)  # real rows per group
    counts[-1] = p - (g - 1) * s
    h, m = k.shape[0], k.shape[1]
    scores = h * min(sel.samples, s) * m * (1 if sel.mode == "logits" else 2)
    per_chunk = max(1, min(sel.chunk_size // s, SCORE_BUDGET // scores))
    for g0 in range(0, g, per_chunk):
        gc = min(per_chunk, g - g0)
        lo, hi = g0 * s, min(p, (g0 + gc) * s)
        x, q = geo_decoder.point_queries(padded[g0 * s:(g0 + gc) * s][None])  # [1, gc*S, W], [1, H, gc*S, D]
        q = q[0].reshape(h, gc, s, -1).transpose(0, 1)  # [gc, H, S, D]
        attended = adaptive_kv_selection(q, k, v, counts[g0:g0 + gc], sel)  # [gc, H, S, D]
        attended = attended.transpose(0, 1).reshape(h, gc * s, -1)[None]  # [1, H, gc*S, D]
        out[lo:hi] = geo_decoder.point_outputs(x, attended)[0, :hi - lo].float()
    return out


@dataclass(frozen=True)
class AdaptiveKVQuery:
    """Point query with adaptive KV selection for :class:`~fvdm.decoding.hierarchical.HierarchicalVolumeDecoder`:
    ``bind(vae, tokens)`` computes every shape's keys/values once and returns the field function."""

    selection: KVSelection = KVSelection()

    def bind(self, vae, tokens: Tensor):
        geo = getattr(vae, "geo_decoder", None)
        if geo is None or not hasattr(geo, "kv"):
            raise ValueError(f"adaptive KV selection needs a VecSetVAE-style geo_decoder (kv / point_queries / "
                             f"point_outputs); {type(vae).__name__} has none")
        k, v = geo.kv(tokens)  # [B, H, M, D] each, once per shape
        device = tokens.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)  # gather half-size keys/values (qk-norm returns fp32)
            k, v = k.to(dtype), v.to(dtype)

        def field(points: Tensor, counts: list[int], cells: Tensor | None = None) -> Tensor:
            """Values [N] at points [N, 3], shape-major (``counts`` per shape); ``cells`` [N, 3] integer grid
            coordinates give the locality order (else the points are quantized)."""
            cells = quantize(points) if cells is None else cells
            out = torch.empty(points.shape[0], dtype=torch.float32, device=points.device)
            for b, (lo, hi) in enumerate(shape_segments(counts)):
                if hi == lo:
                    continue
                order = torch.argsort(morton_code(cells[lo:hi])) + lo
                out[order] = selected_attend(geo, points[order], k[b], v[b], self.selection)
            return out

        return field


@torch.no_grad()
def query_with_kv_selection(vae, tokens: Tensor, points: Tensor, selection: KVSelection = KVSelection()) -> Tensor:
    """Drop-in for ``vae.query(tokens, points)`` [B, P, 3] -> [B, P] with adaptive KV selection (free points are
    grouped along the Morton order of a 1024^3 grid over their bounding box)."""
    b, p, _ = points.shape
    field = AdaptiveKVQuery(selection).bind(vae, tokens)
    return field(points.reshape(b * p, 3), [p] * b).view(b, p)


def attention_flops(queries: int, num_tokens: int, width: int, selection: KVSelection | None = None) -> int:
    """Matmul FLOPs of the cross-attention core (q k^T and the weighted sum of v) for ``queries`` points of one shape
    with ``num_tokens`` latent tokens and decoder width ``width`` (= heads x head dim), plus KV selection's scoring."""
    if selection is None:
        return 4 * queries * num_tokens * width
    groups = -(-queries // selection.group_size)
    scoring = 2 * groups * min(selection.samples, selection.group_size) * num_tokens * width
    return 4 * queries * selection.keys(num_tokens) * width + scoring
