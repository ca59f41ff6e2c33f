"""``fvdm quickstart``: the main job on the embedded default, sized for a 2-core CPU.

Generates the procedural shape set, trains the tiny VAE, finetunes its efficient decoder, and prints
V-IoU, S-IoU (beside their trivial baselines), FLOPs per query and decode time for both.
"""
from __future__ import annotations

import os
from pathlib import Path

from fvdm.config import EXPERIMENTS
from fvdm.data.sampling import SampleCounts
from fvdm.data.synth import run_synth
from fvdm.train import train

QUICK_COUNTS = SampleCounts(surface=4096, sharp=1024, vol=16384, near=16384, renders=2, render_size=128)
NUM_SHAPES = 240
METRICS = ("val/v_iou", "val/v_iou_baseline", "val/s_iou", "val/s_iou_baseline", "val/chamfer", "val/decode_ms")


def _stage(name: str, root: Path, data: Path, *extra: str) -> dict[str, float]:
    args = [str(EXPERIMENTS / f"{name}.yaml"), str(EXPERIMENTS / "presets" / f"tiny-{name}.yaml"),
            f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"run_root={root / 'runs'}",
            "tracking.experiment=quickstart", *extra]
    _, trainer = train(args)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def quickstart(root: str | Path = "quickstart") -> dict[str, dict[str, float]]:
    from fvdm.models.vae import flops_per_query
    from fvdm.stages.checkpoints import load_pretrained_vae

    root = Path(root)
    data = root / "data"
    run_synth(data, num=NUM_SHAPES, seed=0, val_fraction=0.1, counts=QUICK_COUNTS, workers=os.cpu_count() or 1)
    results = {"vae": _stage("vae", root, data)}
    vae_ckpt = root / "runs" / "vae" / "checkpoints" / "last.ckpt"
    results["decoder_ft"] = _stage("decoder_ft", root, data, f"init_from={vae_ckpt}")
    flops = {name: flops_per_query(load_pretrained_vae(root / "runs" / name / "checkpoints" / "last.ckpt").cfg)
             for name in results}
    print(summary(results, flops))
    print(f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{(root / 'runs' / 'mlflow.db').resolve()}")
    return results


def summary(results: dict[str, dict[str, float]], flops: dict[str, int]) -> str:
    head = f"{'stage':<12}" + "".join(f"{m.split('/')[-1]:>17}" for m in METRICS) + f"{'MFLOP/query':>14}"
    rows = [head, "-" * len(head)]
    for stage, metrics in results.items():
        cells = "".join(f"{metrics.get(m, float('nan')):>17.4f}" for m in METRICS)
        rows.append(f"{stage:<12}{cells}{flops[stage] / 1e6:>14.2f}")
    return "\n".join(rows)
