"""``fvdm bench guidance``: the DiT issue's two quality bars on the embedded default, at a training length the
2-core quickstart cannot give. It runs the quickstart's VAE chain (tiny presets), trains the tiny teacher for
``--flow-steps`` at ``--batch-size``, then one guidance-distilled student per ``--student`` from that teacher,
and records:

- the teacher's 50-step samples against the held-out shapes: CFG at w = 5, conditional without guidance (w = 1),
  unconditional (the baseline), and the VAE's reconstruction (the ceiling);
- each student: IoU between its 50-step meshes and the teacher's 50-step CFG meshes from the same noise, and its
  velocity error relative to the teacher's guided velocity per timestep band.

Every number averages ``--noise-draws`` samples per held-out shape (``eval.noise_draws``): with one draw, the
IoU of 24 shapes moved by +-0.02 to 0.04 between runs of equal velocity error.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from fvdm.bench.results import record
from fvdm.quickstart import NUM_SHAPES, run_stage, vae_chain

TEACHER_KEYS = ("gen_v_iou", "gen_v_iou_w1", "gen_v_iou_uncond", "recon_v_iou")
STUDENT_KEYS = ("student_teacher_v_iou", "gen_v_iou", "teacher_gen_v_iou",
                *(f"vel_rel_err_t{i}" for i in range(5)))


def student_spec(text: str) -> tuple[str, list[str]]:
    """``NAME[:KEY=VALUE ...]`` -> (name, overrides)."""
    name, _, overrides = text.partition(":")
    if not name or "=" in name:
        raise argparse.ArgumentTypeError(f"--student {text!r}: expected NAME[:KEY=VALUE ...]")
    return name, overrides.split()


def length(steps: int, batch_size: int, workers: int, draws: int, eval_batches: int) -> list[str]:
    """Overrides that run a stage ``steps`` steps at ``batch_size`` and evaluate (and save) once, at the end."""
    return [f"trainer.max_steps={steps}", f"trainer.val_every_n_steps={steps}",
            f"trainer.checkpoint_every_n_steps={steps}", f"data.batch_size={batch_size}",
            f"data.num_workers={workers}", f"eval.noise_draws={draws}", f"eval.max_batches={eval_batches}"]


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="fvdm bench guidance")
    p.add_argument("--root", default="bench-runs/guidance", help="a fresh directory (data, runs, MLflow store)")
    p.add_argument("--shapes", type=int, default=NUM_SHAPES, help="embedded-default shapes (a tenth held out)")
    p.add_argument("--vae-scale", type=float, default=1.0, help="fraction of the tiny VAE stages' steps")
    p.add_argument("--flow-steps", type=int, default=12000)
    p.add_argument("--guidance-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--noise-draws", type=int, default=4, help="samples per held-out shape in every evaluation")
    p.add_argument("--eval-batches", type=int, default=3, help="validation batches of 8 shapes (3: all 24)")
    p.add_argument("--student", type=student_spec, action="append", metavar="NAME[:KEY=VALUE ...]",
                   help="a guidance student with these overrides (repeatable; default: one, the preset's)")
    p.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=True,
                   help="MLflow runs in ROOT/runs (--no-tracking: none, and mlflow need not be installed)")
    p.add_argument("--results", default="benchmarks/results.json")
    a = p.parse_args(argv)
    root = Path(a.root)
    data, runs = root / "data", root / "runs"
    minutes: dict[str, float] = {}
    t0 = time.perf_counter()
    tracking = f"tracking.enabled={a.tracking}"
    vae_chain(root, minutes, vae_scale=a.vae_scale, decoder_scale=a.vae_scale, num_shapes=a.shapes, extra=(tracking,))
    common = [f"latents={data / 'latents'}", tracking,
              *length(a.flow_steps, a.batch_size, a.workers, a.noise_draws, a.eval_batches)]
    teacher = run_stage("flow", root, data, f"vae_from={runs / 'decoder_ft' / 'checkpoints' / 'last.ckpt'}",
                        *common, timings=minutes)
    common[2:] = length(a.guidance_steps, a.batch_size, a.workers, a.noise_draws, a.eval_batches)
    students = {}
    for name, overrides in a.student or [("default", [])]:
        metrics = run_stage("guidance", root, data, f"init_from={runs / 'flow' / 'checkpoints' / 'last.ckpt'}",
                            f"name=guidance-{name}", *common, *overrides, timings=minutes)
        students[name] = {"overrides": overrides, "minutes": minutes.pop("guidance"),
                          **{k: metrics[f"val/{k}"] for k in STUDENT_KEYS}}
        print(f"student {name}: {students[name]}", flush=True)
    figures = {"minutes": (time.perf_counter() - t0) / 60, "shapes": a.shapes, "vae_scale": a.vae_scale,
               "flow_steps": a.flow_steps, "guidance_steps": a.guidance_steps, "batch_size": a.batch_size,
               "noise_draws": a.noise_draws, "eval_batches": a.eval_batches, "stage_minutes": minutes,
               "teacher": {k: teacher[f"val/{k}"] for k in TEACHER_KEYS}, "students": students}
    entry = record("guidance", figures, path=a.results)
    print(entry)
    return entry
