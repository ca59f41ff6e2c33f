"""``fvdm quickstart``: the main job on the embedded default, sized for a 2-core CPU.

Generates the procedural shape set, trains the tiny VAE, finetunes its efficient decoder, trains the tiny
teacher DiT on that VAE's latents, distils its guidance into a one-pass student, then runs the consistency
chain (5-phase CFD, phase-1 finetune, adversarial finetune). Prints V-IoU, S-IoU (beside their trivial
baselines), FLOPs per query and decode time of both VAEs; the sampled meshes' IoU against the held-out shapes
(teacher beside its unconditional baseline; guidance student beside the teacher) and the student's velocity
error per timestep band; and the few-step table: each student's 1/2/3/5-step meshes and the teacher's own
Euler samples at those counts, as occupancy IoU against the teacher's 50-step meshes from the same noise.
"""
from __future__ import annotations

import os
from pathlib import Path

from fvdm.config import EXPERIMENTS
from fvdm.data.latents import cache_latents
from fvdm.data.sampling import SampleCounts
from fvdm.data.synth import run_synth
from fvdm.train import train

QUICK_COUNTS = SampleCounts(surface=4096, sharp=1024, vol=16384, near=16384, renders=2, render_size=128)
NUM_SHAPES = 240
METRICS = ("val/v_iou", "val/v_iou_baseline", "val/s_iou", "val/s_iou_baseline", "val/chamfer", "val/decode_ms")
DIFFUSION_METRICS = {
    "flow": ("val/gen_v_iou", "val/gen_v_iou_uncond", "val/recon_v_iou"),
    "guidance": ("val/gen_v_iou", "val/teacher_gen_v_iou", "val/student_teacher_v_iou",
                 *(f"val/vel_rel_err_t{i}" for i in range(5))),
}
FEW_STEPS = (1, 2, 3, 5)
CONSISTENCY_RUNS = ("consistency", "consistency_phase1", "adversarial")


def _stage(name: str, root: Path, data: Path, *extra: str, files: tuple[str, ...] = ()) -> dict[str, float]:
    args = [str(EXPERIMENTS / f"{name}.yaml"), *(str(EXPERIMENTS / f) for f in files),
            str(EXPERIMENTS / "presets" / f"tiny-{name}.yaml"),
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
    runs = root / "runs"
    decoder_ckpt = runs / "decoder_ft" / "checkpoints" / "last.ckpt"
    cache_latents(decoder_ckpt, str(data / "train"), data / "latents", num_surface=2048, device="cpu")
    latents = f"latents={data / 'latents'}"  # the diffusion stages stream these instead of encoding
    results["flow"] = _stage("flow", root, data, f"vae_from={decoder_ckpt}", latents)
    results["guidance"] = _stage("guidance", root, data, f"init_from={runs / 'flow' / 'checkpoints' / 'last.ckpt'}",
                                 latents)
    results["consistency"] = _stage("consistency", root, data,
                                    f"init_from={runs / 'guidance' / 'checkpoints' / 'last.ckpt'}", latents)
    results["consistency_phase1"] = _stage(
        "consistency", root, data, f"init_from={runs / 'consistency' / 'checkpoints' / 'last.ckpt'}", latents,
        "optim.lr=1e-5", files=("consistency_phase1.yaml",))
    results["adversarial"] = _stage("adversarial", root, data,
                                    f"init_from={runs / 'consistency_phase1' / 'checkpoints' / 'last.ckpt'}",
                                    latents)
    print(summary(results, flops))
    print(diffusion_summary(results))
    print(few_step_summary(results))
    print(f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{(root / 'runs' / 'mlflow.db').resolve()}")
    return results


def summary(results: dict[str, dict[str, float]], flops: dict[str, int]) -> str:
    head = f"{'stage':<12}" + "".join(f"{m.split('/')[-1]:>17}" for m in METRICS) + f"{'MFLOP/query':>14}"
    rows = [head, "-" * len(head)]
    for stage, metrics in results.items():
        if stage not in flops:
            continue
        cells = "".join(f"{metrics.get(m, float('nan')):>17.4f}" for m in METRICS)
        rows.append(f"{stage:<12}{cells}{flops[stage] / 1e6:>14.2f}")
    return "\n".join(rows)


def diffusion_summary(results: dict[str, dict[str, float]]) -> str:
    """One line per diffusion stage: metric=value pairs (50-step samples against held-out shapes)."""
    rows = []
    for stage, names in DIFFUSION_METRICS.items():
        if stage in results:
            cells = "  ".join(f"{n.split('/')[-1]}={results[stage].get(n, float('nan')):.4f}" for n in names)
            rows.append(f"{stage:<10}{cells}")
    return "\n".join(rows)


def few_step_summary(results: dict[str, dict[str, float]]) -> str:
    """IoU against the teacher's 50-step meshes (same noise and image) at 1, 2, 3 and 5 steps: the teacher's
    own Euler samples, then each consistency student."""
    head = f"{'IoU vs teacher 50 steps':<26}" + "".join(f"{f'{k} steps':>10}" for k in FEW_STEPS)
    rows = [head, "-" * len(head)]
    first = results.get(CONSISTENCY_RUNS[0], {})
    rows.append(f"{'teacher (Euler)':<26}" + "".join(
        f"{first.get(f'val/teacher_{k}step_iou_vs_teacher50', float('nan')):>10.4f}" for k in FEW_STEPS))
    for run in CONSISTENCY_RUNS:
        if run in results:
            rows.append(f"{run:<26}" + "".join(
                f"{results[run].get(f'val/student_{k}step_iou_vs_teacher50', float('nan')):>10.4f}"
                for k in FEW_STEPS))
    return "\n".join(rows)
