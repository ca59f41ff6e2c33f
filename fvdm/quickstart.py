"""``fvdm quickstart``: the main job on the embedded default, sized for a 2-core CPU.

Generates the procedural shape set, trains the tiny VAE, finetunes its efficient decoder, trains the tiny
teacher DiT on that VAE's latents, distils its guidance into a one-pass student, then runs the consistency
chain (5-phase CFD, phase-1 finetune, adversarial finetune), and prints one summary table, a row per stage:
its key held-out metric, decode time, the 5-step students' IoU against the teacher's 50-step meshes (beside
the teacher's own 5-step Euler samples) and its wall time. The table is also attached to every stage's
MLflow run as ``tables/quickstart.txt``.

``scale`` shortens every stage to that fraction of its tiny preset's ``trainer.max_steps`` (validation,
evaluation and checkpoint once, at the end; warm-up scaled alike). ``fvdm quickstart`` by default trains the two
VAE stages in full (every later stage learns on their latents; at 0.25 the VAE ended at V-IoU 0.07) and the
diffusion stages at ``DEFAULT_SCALE``. ``fvdm bench quickstart`` runs the full-size chain (scale 1).
"""
from __future__ import annotations

import math
import os
import textwrap
import time
from pathlib import Path
from typing import Any

from fvdm.config import EXPERIMENTS, TrackingConfig
from fvdm.data.latents import cache_latents
from fvdm.data.sampling import SampleCounts
from fvdm.data.synth import run_synth
from fvdm.train import resolve, train

QUICK_COUNTS = SampleCounts(surface=4096, sharp=1024, vol=16384, near=16384, renders=2, render_size=128)
NUM_SHAPES = 240  # 216 train, 24 held out
DEFAULT_SCALE = 0.25
MIN_STEPS = 10
STAGES = ("vae", "decoder_ft", "flow", "guidance", "consistency", "consistency_phase1", "adversarial")
VAE_STAGES = ("vae", "decoder_ft")
CONSISTENCY_RUNS = ("consistency", "consistency_phase1", "adversarial")
DEFAULT_SCALES = {name: 1.0 if name in VAE_STAGES else DEFAULT_SCALE for name in STAGES}
# key metric of each stage: V-IoU against held-out shapes (VAEs), 50-step CFG samples against held-out shapes
# (teacher), student vs teacher 50-step samples (guidance), 5-step student vs teacher 50-step (consistency)
KEY_METRIC = {"vae": "val/v_iou", "decoder_ft": "val/v_iou", "flow": "val/gen_v_iou",
              "guidance": "val/student_teacher_v_iou",
              **{run: "val/student_5step_iou_vs_teacher50" for run in CONSISTENCY_RUNS}}
TEACHER_5STEP = "val/teacher_5step_iou_vs_teacher50"


def scaled_overrides(cfg: Any, scale: float) -> list[str]:
    """``key=value`` overrides that shorten the resolved stage config ``cfg`` to ``scale`` of its
    ``trainer.max_steps`` (at least ``MIN_STEPS``): validation, reconstruction evaluation and checkpoint once,
    at the last step; warm-up steps scaled alike and kept below half the steps. None at scale 1."""
    if scale == 1:
        return []
    steps = max(MIN_STEPS, round(cfg.trainer.max_steps * scale))
    out = [f"trainer.max_steps={steps}", f"trainer.val_every_n_steps={steps}",
           f"trainer.checkpoint_every_n_steps={steps}", f"trainer.log_every_n_steps={min(25, max(1, steps // 4))}"]
    if hasattr(cfg.eval, "every_n_steps"):  # VAE stages: ReconstructionEval
        out.append(f"eval.every_n_steps={steps}")
    for section in ("optim", "d_optim"):
        warmup = getattr(getattr(cfg, section, None), "warmup_steps", 0)
        if warmup:
            out.append(f"{section}.warmup_steps={min(max(1, math.ceil(warmup * scale)), steps // 2)}")
    return out


def run_stage(name: str, root: Path, data: Path, *extra: str, files: tuple[str, ...] = (), scale: float = 1.0,
           timings: dict[str, float]) -> dict[str, float]:
    config = files[0].removesuffix(".yaml") if files else name
    args = [str(EXPERIMENTS / f"{name}.yaml"), *(str(EXPERIMENTS / f) for f in files),
            str(EXPERIMENTS / "presets" / f"tiny-{name}.yaml"),
            f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"run_root={root / 'runs'}",
            "tracking.experiment=quickstart", *extra]
    args += scaled_overrides(resolve(args), scale)
    t0 = time.perf_counter()
    _, trainer = train(args)
    timings[config] = (time.perf_counter() - t0) / 60
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def vae_chain(root: Path, minutes: dict[str, float], vae_scale: float = 1.0, decoder_scale: float = 1.0,
              num_shapes: int = NUM_SHAPES, extra: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """The chain's first half in ``root``: synthesise ``num_shapes`` embedded-default shapes into ``data/``,
    train the tiny VAE and its efficient decoder (``runs/vae``, ``runs/decoder_ft``) and cache the latter's
    latents of the training shapes in ``data/latents``; record each step's minutes in ``minutes`` and return
    the two VAE stages' final metrics. ``extra``: overrides for both stages."""
    data, runs = root / "data", root / "runs"
    t0 = time.perf_counter()
    run_synth(data, num=num_shapes, seed=0, val_fraction=0.1, counts=QUICK_COUNTS, workers=os.cpu_count() or 1)
    minutes["synth"] = (time.perf_counter() - t0) / 60
    results = {"vae": run_stage("vae", root, data, *extra, scale=vae_scale, timings=minutes)}
    results["decoder_ft"] = run_stage("decoder_ft", root, data,
                                      f"init_from={runs / 'vae' / 'checkpoints' / 'last.ckpt'}", *extra,
                                      scale=decoder_scale, timings=minutes)
    t0 = time.perf_counter()
    cache_latents(runs / "decoder_ft" / "checkpoints" / "last.ckpt", str(data / "train"), data / "latents",
                  num_surface=2048, device="cpu")
    minutes["cache_latents"] = (time.perf_counter() - t0) / 60
    return results


def quickstart(root: str | Path = "quickstart", scale: float | None = None) -> dict[str, dict[str, float]]:
    """Run the chain in ``root`` (data, runs, MLflow store) at ``scale`` of the tiny presets' steps (None:
    ``DEFAULT_SCALES``, per stage), print the summary table and return every stage's final metrics plus its
    ``minutes`` (``synth`` and ``cache_latents`` have only their minutes)."""
    from mlflow.tracking import MlflowClient

    from fvdm.models.vae import flops_per_query
    from fvdm.stages.checkpoints import load_pretrained_vae
    from fvdm.tracking import log_table, recorded_run_id, tracking_uri

    if scale is not None and not scale > 0:
        raise ValueError(f"quickstart: scale must be > 0, got {scale}")
    scales = DEFAULT_SCALES if scale is None else dict.fromkeys(STAGES, scale)
    root = Path(root)
    data, runs = root / "data", root / "runs"
    minutes: dict[str, float] = {}
    results = vae_chain(root, minutes, vae_scale=scales["vae"], decoder_scale=scales["decoder_ft"])
    flops = {name: flops_per_query(load_pretrained_vae(runs / name / "checkpoints" / "last.ckpt").cfg)
             for name in VAE_STAGES}
    decoder_ckpt = runs / "decoder_ft" / "checkpoints" / "last.ckpt"
    latents = f"latents={data / 'latents'}"  # the diffusion stages stream these instead of encoding
    results["flow"] = run_stage("flow", root, data, f"vae_from={decoder_ckpt}", latents, scale=scales["flow"],
                                timings=minutes)
    results["guidance"] = run_stage("guidance", root, data,
                                    f"init_from={runs / 'flow' / 'checkpoints' / 'last.ckpt'}",
                                    latents, scale=scales["guidance"], timings=minutes)
    results["consistency"] = run_stage("consistency", root, data,
                                       f"init_from={runs / 'guidance' / 'checkpoints' / 'last.ckpt'}", latents,
                                       scale=scales["consistency"], timings=minutes)
    results["consistency_phase1"] = run_stage(
        "consistency", root, data, f"init_from={runs / 'consistency' / 'checkpoints' / 'last.ckpt'}", latents,
        "optim.lr=1e-5", files=("consistency_phase1.yaml",), scale=scales["consistency_phase1"], timings=minutes)
    results["adversarial"] = run_stage("adversarial", root, data,
                                       f"init_from={runs / 'consistency_phase1' / 'checkpoints' / 'last.ckpt'}",
                                       latents, scale=scales["adversarial"], timings=minutes)
    for name, value in minutes.items():
        results.setdefault(name, {})["minutes"] = value
    table = summary(results, scales=scales, flops=flops)
    print(table)
    client = MlflowClient(tracking_uri(TrackingConfig(), runs))
    for name in STAGES:  # the numbers beside every stage's run in the MLflow UI
        log_table(client, recorded_run_id(runs / name), table + "\n", "quickstart.txt")
    print(f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{(runs / 'mlflow.db').resolve()}")
    return results


def _scales(scales: dict[str, float]) -> str:
    """"scale 0.25" when every stage ran at one scale, else "scale 1 (vae, decoder_ft), 0.25 (flow, ...)"."""
    groups: dict[float, list[str]] = {}
    for stage, value in scales.items():
        groups.setdefault(value, []).append(stage)
    if len(groups) == 1:
        return f"scale {next(iter(groups)):g}"
    return "scale " + ", ".join(f"{value:g} ({', '.join(stages)})" for value, stages in groups.items())


def _cell(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def summary(results: dict[str, dict[str, float]], scales: dict[str, float] | None = None,
            flops: dict[str, int] | None = None) -> str:
    """The quickstart's one table from its results (stage -> metrics with ``val/`` keys and ``minutes``): a row
    per stage of ``STAGES`` (key metric, decode ms, 5-step IoU against the teacher's 50-step meshes, minutes),
    the teacher's own 5-step Euler samples as a reference row before the consistency stages, "-" where a value
    is missing; then footnotes, the minutes of synth and cache-latents and the total."""
    head = f"{'stage':<26}{'key metric':<38}{'decode ms':>11}{'5-step IoU vs teacher':>23}{'minutes':>9}"
    rows = [head, "-" * len(head)]
    decoder_ms = results.get("decoder_ft", {}).get("val/decode_ms")
    diffusion_decode = "-" if decoder_ms is None else f"{decoder_ms:.0f}*"  # the decoder_ft VAE's
    for stage in STAGES:
        metrics = results.get(stage, {})
        if stage == CONSISTENCY_RUNS[0]:
            first = next((results[r] for r in CONSISTENCY_RUNS if TEACHER_5STEP in results.get(r, {})), {})
            rows.append(f"{'teacher (Euler, 5 steps)':<26}{'-':<38}{diffusion_decode:>11}"
                        f"{_cell(first.get(TEACHER_5STEP)):>23}{'-':>9}")
        key = KEY_METRIC[stage]
        metric = f"{key.removeprefix('val/')}={_cell(metrics[key])}" if key in metrics else "-"
        decode = _cell(metrics.get("val/decode_ms"), ".0f") if stage in VAE_STAGES else diffusion_decode
        five = metrics.get("val/student_5step_iou_vs_teacher50") if stage in CONSISTENCY_RUNS else None
        rows.append(f"{stage:<26}{metric:<38}{decode:>11}{_cell(five):>23}{_cell(metrics.get('minutes'), '.1f'):>9}")
    rows.append("-" * len(head))
    notes = ["key metric: V-IoU on the held-out shapes (VAEs); IoU of the teacher's 50-step CFG samples (w = 5) "
             "against the held-out shapes (flow); IoU between the student's and the teacher's 50-step samples "
             "(guidance); IoU of the 5-step samples against the teacher's 50-step samples from the same noise "
             "and image (consistency stages, and the teacher's own 5-step Euler samples).",
             "* decode ms of the decoder_ft VAE, which the diffusion stages decode their latents with."]
    extra = [f"{name} {results[name]['minutes']:.1f} min" for name in ("synth", "cache_latents")
             if "minutes" in results.get(name, {})]
    if extra:
        total = sum(m["minutes"] for m in results.values() if "minutes" in m)
        notes.append(", ".join(extra) + f"; total {total:.1f} min" + (f" at {_scales(scales)}." if scales else "."))
    if flops:
        notes.append("MFLOP per query: " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in flops.items()) + ".")
    rows += [line for note in notes for line in textwrap.wrap(note, len(head), subsequent_indent="  ")]
    return "\n".join(rows)
