"""``fvdm bench quickstart``: run the quickstart pipeline (embedded default, tiny presets) and record every
stage's held-out numbers and wall time in ``benchmarks/results.json``: the tiny-VAE bar of the VAE issue and
the teacher / guidance-distillation bars of the DiT issue, measured by one reproducible command. It runs the
full-size chain (``--scale 1``) unless told otherwise; ``--scale`` shortens every stage as ``fvdm quickstart``
does."""
from __future__ import annotations

import argparse
import time

from fvdm.bench.results import record


def main(argv: list[str]) -> dict:
    from fvdm.quickstart import quickstart

    p = argparse.ArgumentParser(prog="fvdm bench quickstart")
    p.add_argument("--root", default="bench-runs/quickstart", help="a fresh directory (data, runs, MLflow store)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of every stage's tiny-preset steps (default 1: the full-size chain; "
                        "fvdm quickstart runs its VAE stages at 1, the rest at 0.25)")
    p.add_argument("--results", default="benchmarks/results.json")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    results = quickstart(a.root, scale=a.scale)
    figures = {"minutes": (time.perf_counter() - t0) / 60, "scale": a.scale,
               **{stage: {k.removeprefix("val/"): v for k, v in metrics.items()
                          if k.startswith("val/") or k == "minutes"}
                  for stage, metrics in results.items()}}
    entry = record("quickstart", figures, path=a.results)
    print(entry)
    return entry
