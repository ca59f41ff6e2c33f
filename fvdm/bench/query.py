"""``fvdm bench query``: geo-decoder query throughput (points/s) of a preset, standard and efficient, under bf16
autocast, with bf16 weights and (``--compile``) with bf16 weights and ``GeoDecoder.compile_queries``, over several
chunk sizes, exact and with adaptive KV selection (one row per group size, Morton grouping included). Random
weights: throughput does not depend on them."""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from fvdm.bench.results import record
from fvdm.decoding.kv_selection import KVSelection, query_with_kv_selection
from fvdm.models.vae import VecSetVAE, vae_preset


def rate(query, points: torch.Tensor, warmup: int, autocast: bool) -> float:
    """Million query points per second of ``query(points)`` for one timed pass after a warm-up on ``warmup``."""
    with torch.no_grad(), torch.autocast(points.device.type, dtype=torch.bfloat16, enabled=autocast):
        query(points[:, :warmup])
        if points.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        query(points)
        if points.is_cuda:
            torch.cuda.synchronize()
    return points.shape[1] / (time.perf_counter() - start) / 1e6


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="fvdm bench query")
    p.add_argument("--preset", default="large")
    p.add_argument("--points", type=int, default=1 << 23)
    p.add_argument("--chunks", type=int, nargs="+", default=[1 << 16, 1 << 18, 1 << 20])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[KVSelection.group_size],
                   help="KV selection rows (top third of the tokens, default settings otherwise)")
    p.add_argument("--compile", action="store_true", help="add bf16 rows with the geo decoder compiled")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", default="benchmarks/results.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for efficient in (False, True):
        cfg = dataclasses.replace(vae_preset(a.preset, efficient=efficient), with_encoder=False)
        vae = VecSetVAE(cfg).to(a.device).eval()
        tokens = torch.randn(1, cfg.num_latents, cfg.width, device=a.device)
        points = torch.rand(1, a.points, 3, device=a.device) * 2 - 1
        for weights in ("fp32+autocast", "bf16", "bf16+compile")[:3 if a.compile else 2]:
            model, tok = (vae, tokens) if weights == "fp32+autocast" else (vae.to(torch.bfloat16), tokens.bfloat16())
            autocast = weights == "fp32+autocast"
            if weights == "bf16+compile":  # last: compiling is in place
                model.geo_decoder.compile_queries()
            for chunk in a.chunks:
                mqps = rate(lambda x: model.query(tok, x, chunk_size=chunk), points, chunk, autocast)
                rows.append({"efficient": efficient, "weights": weights, "chunk": chunk, "m_queries_per_s": mqps})
                print(f"efficient={efficient!s:5} {weights:13s} chunk={chunk:8d} {mqps:7.1f} M queries/s")
            for group in a.group_sizes:
                sel = KVSelection(group_size=group)
                mqps = rate(lambda x: query_with_kv_selection(model, tok, x, sel), points, sel.chunk_size, autocast)
                rows.append({"efficient": efficient, "weights": weights, "chunk": sel.chunk_size,
                             "kv_group_size": group, "kv_keys": sel.keys(cfg.num_latents), "m_queries_per_s": mqps})
                print(f"efficient={efficient!s:5} {weights:13s} KV selection group={group:5d} {mqps:7.1f} M queries/s")
    return record("query", {"preset": a.preset, "points": a.points, "compile": a.compile, "rows": rows}, path=a.results)
