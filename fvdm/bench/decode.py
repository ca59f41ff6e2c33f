"""``fvdm bench decode``: the paper's Table 3 (lightning vecset decoder ablation) as measured numbers.

Rows, each adding one technique: ``dense`` (every grid point), ``+ hierarchical`` (algorithm 1), ``+ efficient
decoder`` (the decoder_ft student), ``+ adaptive KV selection`` (algorithm 2), then fvdm's ``+ narrow cascade``
(``fast_decoder``: ``near_band="cells"``, ``final_cells="crossing"``) and the narrow cascade with exact attention.
Columns: V-IoU and S-IoU of the decoded field (trilinear at held-out volume / near-surface SDF samples, against
the ground truth), milliseconds per shape from latents to mesh (median of synchronized repeats after a warm-up,
torch marching cubes in every row), queries and attention FLOPs per shape, and the time per stage (trunk decode,
each cascade level, surface extraction). bf16 on CUDA (see ``--weights``). Beside the table, ``held_out``: the
eval callback's V-IoU / S-IoU of each model over every held-out shape at its point samples (issue 10's decoder
bar: efficient within 1 point).

Models: ``--vae`` and ``--efficient-vae`` checkpoints, or ``--hunyuan3d`` (a released VAE folder with an encoder)
and optionally ``--hunyuan3d-efficient`` (e.g. the turbo VAE, which decodes the same latents), or
``--train-minutes M``: a preset VAE, then its efficient decoder (stage decoder_ft, initialised from the first),
each trained M minutes on the embedded default data set generated here; with ``--vae CKPT`` only the efficient
decoder is trained, from that checkpoint (e.g. the VAE that ``fvdm bench vae`` saved).

``--weights bf16`` (the default with ``--precision bf16`` on CUDA) decodes every row with bf16 copies of the models
and autocast off, the deployment setting: under autocast, LayerNorms and residuals run in fp32 whatever the weights,
and at the efficient decoder's width that elementwise traffic is most of the time (``fvdm bench query`` on an H100:
101 against 74 M queries/s for the efficient base decoder, 27 against 19 for the standard one). ``--weights fp32``
decodes under bf16 autocast instead. Latents are always encoded first, by the fp32 encoder under autocast.
``--compile`` runs every row's geo decoder through ``GeoDecoder.compile_queries``; the eval shapes, decoded before
any timing, absorb the compilation.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from fvdm.bench.results import record
from fvdm.callbacks.reconstruction import EvalSettings, run_evaluation
from fvdm.config import DataConfig
from fvdm.data.datamodule import ShapeDataModule
from fvdm.data.sampling import SampleCounts
from fvdm.data.synth import run_synth
from fvdm.decoding.dense import DenseVolumeDecoder
from fvdm.decoding.grid import DEFAULT_BOUNDS, sample_field
from fvdm.decoding.hierarchical import ExactQuery, HierarchicalVolumeDecoder
from fvdm.decoding.kv_selection import AdaptiveKVQuery, KVSelection, attention_flops
from fvdm.decoding.mesh import decode_mesh, fast_decoder, marching_cubes_torch
from fvdm.metrics.reconstruction import OccupancyIoU
from fvdm.models.vae import flops_per_query
from fvdm.stages.checkpoints import load_pretrained_vae, save_vae_checkpoint


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fvdm bench decode", description=__doc__.splitlines()[0])
    src = p.add_argument_group("models (one of)")
    src.add_argument("--vae", help="standard VAE checkpoint (vae stage, or any load_pretrained_vae source)")
    src.add_argument("--efficient-vae", help="its efficient-decoder student (decoder_ft checkpoint)")
    src.add_argument("--hunyuan3d", help="released Hunyuan3D-2 VAE folder with an encoder")
    src.add_argument("--hunyuan3d-efficient", help="released efficient (turbo) VAE folder decoding the same latents")
    src.add_argument("--train-minutes", type=float,
                     help="train a VAE, then its efficient decoder, M minutes each (with --vae: only the decoder)")
    train = p.add_argument_group("training (--train-minutes)")
    train.add_argument("--preset", default="large")
    train.add_argument("--train-shapes", type=int, default=1000, help="shapes generated (10%% held out)")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=2e-4, help="the VAE's peak learning rate")
    # a long warm-up is what let base train at all in short runs (fvdm bench vae); large is deeper and wider
    train.add_argument("--warmup", type=int, default=1000,
                       help="the VAE's linear warm-up steps, then a cosine over the --train-minutes wall clock")
    train.add_argument("--num-points", type=int, default=4096, help="volume and near-surface points per step")
    train.add_argument("--run-root", default="bench-runs")
    train.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    train.add_argument("overrides", nargs="*", help="extra key=value overrides for both training stages")
    run = p.add_argument_group("benchmark")
    run.add_argument("--data", default="bench-data/decode", help="shard set (made here if missing); val/ is used")
    run.add_argument("--resolution", type=int, default=384)
    run.add_argument("--eval-shapes", type=int, default=8, help="held-out shapes scored for V-IoU / S-IoU")
    run.add_argument("--timing-shapes", type=int, default=2, help="shapes timed (after one warm-up decode)")
    run.add_argument("--repeats", type=int, default=3, help="timed decodes per timing shape")
    run.add_argument("--min-resolution", type=int, default=48, help="coarsest cascade level is >= this")
    run.add_argument("--topk", type=float, default=1 / 3, help="share of the tokens kept by KV selection")
    run.add_argument("--group-size", type=int, default=KVSelection.group_size)
    run.add_argument("--kv-samples", type=int, default=KVSelection.samples)
    run.add_argument("--kv-mode", default=KVSelection.mode, choices=["softmax", "logits", "union"])
    run.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast on CUDA")
    run.add_argument("--weights", default="bf16", choices=["bf16", "fp32"],
                     help="bf16: decode with bf16 models, autocast off (only with --precision bf16 on CUDA)")
    run.add_argument("--compile", action="store_true",
                     help="GeoDecoder.compile_queries on every model (all rows; the eval shapes warm it up)")
    run.add_argument("--device", default=None)
    run.add_argument("--results", default="benchmarks/results.json")
    return p.parse_args(argv)


def data_config(a: argparse.Namespace, cfg) -> DataConfig:
    """Encoder input sized to the VAE's pools (uniform rows, then sharp-edge rows when it has a sharp pool)."""
    sharp = cfg.pc_sharpedge_size
    return DataConfig(train=f"{a.data}/train", val=f"{a.data}/val", batch_size=a.batch_size, val_batch_size=1,
                      num_workers=min(8, a.workers), num_surface=cfg.pc_size,
                      num_sharp=sharp, num_vol=a.num_points, num_near=a.num_points, shuffle_buffer=256)


def make_data(a: argparse.Namespace, cfg) -> None:
    counts = SampleCounts(surface=cfg.pc_size, sharp=4096, vol=32768, near=32768, renders=0)
    run_synth(a.data, num=a.train_shapes, seed=0, val_fraction=0.1, counts=counts, workers=a.workers,
              shard_size=64)


def train_models(a: argparse.Namespace):
    """A ``preset`` VAE (stage vae; skipped when ``--vae`` gives one), then its efficient decoder (stage
    decoder_ft from that checkpoint)."""
    from fvdm.models.vae import vae_preset
    from fvdm.bench.training import fit_capped, time_cap, wall_clock_schedule
    from fvdm.stages.decoder_ft import DecoderFinetune
    from fvdm.stages.vae import VAEStage

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, steps = [], []
    if a.vae:
        models.append(load_pretrained_vae(a.vae).to(device))
        cfg, init = models[0].cfg, a.vae
    else:
        cfg, init = vae_preset(a.preset), f"{a.run_root}/bench-decode-vae.ckpt"
    if not Path(a.data, "train").is_dir():
        make_data(a, cfg)
    d = data_config(a, cfg)
    common = [f"data.train={d.train}", f"data.val={d.val}", f"data.batch_size={d.batch_size}",
              f"data.num_surface={d.num_surface}", f"data.num_sharp={d.num_sharp}", f"data.num_vol={d.num_vol}",
              f"data.num_near={d.num_near}", f"data.num_workers={d.num_workers}", "data.shuffle_buffer=256",
              f"run_root={a.run_root}", "trainer.max_steps=100000", f"trainer.max_time={time_cap(a.train_minutes)}",
              f"trainer.precision={'bf16-mixed' if a.precision == 'bf16' else '32-true'}",
              "trainer.checkpoint_every_n_steps=1000000", "trainer.log_every_n_steps=50",
              "eval.every_n_steps=1000000", "eval.max_batches=1", "eval.num_mesh_shapes=1", "eval.resolution=64"]
    stages = [("decoder_ft", DecoderFinetune, [f"init_from={init}"], [])]
    if not a.vae:
        schedule, cosine = wall_clock_schedule(a.train_minutes, a.warmup)
        stages.insert(0, ("vae", VAEStage, [f"vae_preset={a.preset}", f"optim.lr={a.lr}", *schedule], [cosine]))
    for stage, module_cls, extra, callbacks in stages:
        module, trainer = fit_capped(stage, module_cls, [*common, f"name=bench-decode-{stage}", *extra, *a.overrides],
                                     callbacks=callbacks)
        save_vae_checkpoint(module.vae, Path(a.run_root) / f"bench-decode-{stage}.ckpt")
        models.append(module.vae.to(device))  # fit() hands the model back on the CPU
        steps.append(trainer.global_step)
    return models[0], models[1], steps


def load_models(a: argparse.Namespace):
    if a.train_minutes is not None:
        if a.efficient_vae or a.hunyuan3d:
            raise SystemExit("fvdm bench decode: --train-minutes trains the efficient decoder (and the VAE unless "
                             "--vae gives one); it does not go with --efficient-vae or --hunyuan3d")
        return train_models(a)
    if a.vae:
        standard = load_pretrained_vae(a.vae)
        efficient = load_pretrained_vae(a.efficient_vae) if a.efficient_vae else None
    elif a.hunyuan3d:
        standard = load_pretrained_vae(a.hunyuan3d)
        efficient = load_pretrained_vae(a.hunyuan3d_efficient) if a.hunyuan3d_efficient else None
    else:
        raise SystemExit("fvdm bench decode: give --vae CKPT [--efficient-vae CKPT], --hunyuan3d PATH "
                         "[--hunyuan3d-efficient PATH] or --train-minutes M")
    if not standard.has_encoder:
        raise SystemExit(f"fvdm bench decode: {a.vae or a.hunyuan3d} has no encoder; held-out shapes need one to "
                         "become latents (use a with-encoder release or an fvdm vae checkpoint)")
    if not Path(a.data, "val").is_dir():
        a.train_shapes = max(a.eval_shapes * 10, 20)
        make_data(a, standard.cfg)
    return standard, efficient, []


class KeepField:
    """Torch marching cubes that also keeps the decoded field (for V-IoU / S-IoU at off-grid points)."""

    def __init__(self):
        self.field = None

    def __call__(self, decoded, level):
        self.field = decoded
        return marching_cubes_torch(decoded, level)


def run_row(name, vae, decoder, latents, samples, a, device, autocast, selection=None) -> dict:
    """Score one row on every eval shape, then time it; returns the row's figures."""
    ious = {"v_iou": OccupancyIoU().to(device), "s_iou": OccupancyIoU().to(device)}
    queries, levels, faces, empty = [], {}, [], 0
    keep = KeepField()
    for lat, (vol, near) in zip(latents, samples):
        with autocast:
            (mesh,) = decode_mesh(vae, lat, a.resolution, DEFAULT_BOUNDS, decoder=decoder, extractor=keep)
        ious["v_iou"].update(sample_field(keep.field, vol[None, :, :3]), vol[None, :, 3])
        ious["s_iou"].update(sample_field(keep.field, near[None, :, :3]), near[None, :, 3])
        queries.append(mesh.stats.queries)
        for r, q in mesh.stats.level_queries.items():
            levels.setdefault(r, []).append(q)
        faces.append(len(mesh.faces))
        empty += mesh.is_empty
    keep.field = None
    runs = []
    for lat in latents[:a.timing_shapes]:
        with autocast:
            decode_mesh(vae, lat, a.resolution, DEFAULT_BOUNDS, decoder=decoder, extractor=marching_cubes_torch)
            for _ in range(a.repeats):
                runs.append(decode_mesh(vae, lat, a.resolution, DEFAULT_BOUNDS, decoder=decoder,
                                        extractor=marching_cubes_torch)[0].stats)
    cfg = vae.cfg
    width = cfg.width // cfg.geo_downsample_ratio
    per_level = {r: statistics.mean(q) for r, q in sorted(levels.items())} or {a.resolution: statistics.mean(queries)}
    keys = selection.keys(cfg.num_latents) if selection else cfg.num_latents
    attn = sum(attention_flops(round(q), cfg.num_latents, width, selection) for q in per_level.values())
    scoring = attn - sum(4 * round(q) * keys * width for q in per_level.values())
    decoder_flops = sum(round(q) * flops_per_query(cfg, keys) for q in per_level.values()) + scoring
    stages = {k: 1000 * statistics.median(r.stages[k] for r in runs) for k in runs[0].stages}
    row = {"row": name, "v_iou": round(100 * float(ious["v_iou"].compute()), 3),
           "s_iou": round(100 * float(ious["s_iou"].compute()), 3),
           "ms_per_shape": round(1000 * statistics.median(r.seconds for r in runs), 3),
           "queries": round(statistics.mean(queries)), "queries_per_level": {r: round(q) for r, q in per_level.items()},
           "attention_gflops": round(attn / 1e9, 3), "decoder_gflops": round(decoder_flops / 1e9, 3),
           "stage_ms": {k: round(v, 3) for k, v in stages.items()}, "faces": round(statistics.mean(faces)),
           "empty_meshes": empty}
    print(f"{name:28s} V-IoU {row['v_iou']:7.3f}  S-IoU {row['s_iou']:7.3f}  {row['ms_per_shape']:10.2f} ms  "
          f"{row['queries']:>10d} queries  {row['attention_gflops']:9.1f} attn GFLOP  stages {row['stage_ms']}",
          flush=True)
    return row


def held_out_ious(models: dict, a: argparse.Namespace, device: torch.device, autocast) -> dict:
    """The eval callback's V-IoU / S-IoU (every held-out shape, posterior mean, at its point samples) of each model:
    the issue-10 decoder bar (efficient decoder within 1 V-IoU point of its VAE) beside the grid-based rows."""
    out = {}
    for name, vae in models.items():
        val = ShapeDataModule(data_config(a, vae.cfg), images=False).val_dataloader()
        metrics, _ = run_evaluation(vae, val, EvalSettings(num_mesh_shapes=0, max_batches=None), device=device,
                                    autocast=autocast)
        out[name] = {"v_iou": round(metrics["v_iou"], 4), "s_iou": round(metrics["s_iou"], 4),
                     "shapes": int(metrics["shapes"])}
    if len(out) == 2:
        out["v_iou_drop_points"] = round(100 * (out["standard"]["v_iou"] - out["efficient"]["v_iou"]), 2)
    print(f"held-out points: {out}", flush=True)
    return out


def main(argv: list[str]) -> dict:
    a = parse(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    standard, efficient, steps = load_models(a)
    setup_s = time.perf_counter() - t0
    standard, efficient = standard.to(device).eval(), efficient.to(device).eval() if efficient else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and a.precision == "bf16"
                else nullcontext())
    held_out = held_out_ious({"standard": standard, **({"efficient": efficient} if efficient else {})}, a, device,
                             autocast)

    # held-out shapes -> latents of the standard encoder (the student shares it, frozen)
    val = ShapeDataModule(data_config(a, standard.cfg), images=False).val_dataloader()
    latents, samples = [], []
    with torch.no_grad(), autocast:
        for batch in val:
            for i in range(len(batch["key"])):
                if len(latents) == a.eval_shapes:
                    break
                latents.append(standard.encode(batch["surface"][i:i + 1].to(device), sample_posterior=False))
                samples.append((batch["vol"][i].to(device), batch["near"][i].to(device)))
            if len(latents) == a.eval_shapes:
                break
    if not latents:
        raise SystemExit(f"fvdm bench decode: no held-out shapes in {a.data}/val")
    half = device.type == "cuda" and a.precision == "bf16" and a.weights == "bf16"
    if half:  # decode with bf16 models and autocast off (the latents above came from the fp32 encoder)
        standard, efficient = standard.to(torch.bfloat16), efficient.to(torch.bfloat16) if efficient else None
        autocast = nullcontext()
    if a.compile:
        for vae in {standard, efficient} - {None}:
            vae.geo_decoder.compile_queries()

    selection = KVSelection(topk=a.topk, group_size=a.group_size, samples=a.kv_samples, mode=a.kv_mode)
    hierarchical = HierarchicalVolumeDecoder(min_resolution=a.min_resolution, query=ExactQuery())
    flash = HierarchicalVolumeDecoder(min_resolution=a.min_resolution, query=AdaptiveKVQuery(selection))
    student = efficient or standard
    rows = [("dense", standard, DenseVolumeDecoder(), None),
            ("+ hierarchical", standard, hierarchical, None),
            ("+ efficient decoder", student, hierarchical, None),
            ("+ adaptive KV selection", student, flash, selection),
            ("+ narrow cascade", student, fast_decoder(selection, min_resolution=a.min_resolution), selection),
            ("narrow cascade, exact attention", student, fast_decoder(None, min_resolution=a.min_resolution), None)]
    if efficient is None:
        print("no efficient VAE given: rows 3 and 4 use the standard decoder")
        rows = [rows[0], rows[1], ("+ adaptive KV selection", standard, flash, selection), *rows[4:]]
    table = [run_row(name, vae, dec, latents, samples, a, device, autocast, sel) for name, vae, dec, sel in rows]
    dense_ms = table[0]["ms_per_shape"]
    for row in table:
        row["speedup"] = round(dense_ms / row["ms_per_shape"], 2)

    def describe(vae):
        c = vae.cfg
        return {"params_m": round(sum(p.numel() for p in vae.parameters()) / 1e6, 2), "tokens": c.num_latents,
                "geo_width": c.width // c.geo_downsample_ratio, "geo_mlp_ratio": c.geo_mlp_ratio,
                "flops_per_query_m": round(flops_per_query(c) / 1e6, 3)}

    figures = {"rows": table, "resolution": a.resolution, "levels": hierarchical.levels(a.resolution),
               "eval_shapes": len(latents), "timing_shapes": min(a.timing_shapes, len(latents)),
               "repeats": a.repeats, "precision": a.precision if device.type == "cuda" else "fp32",
               "weights": "bf16" if half else "fp32", "compiled": a.compile,
               "selection": {"topk": selection.keys(standard.cfg.num_latents), "group_size": a.group_size,
                             "samples": a.kv_samples, "mode": a.kv_mode},
               "standard": describe(standard), "efficient": describe(efficient) if efficient else None,
               "source": ("trained" if a.train_minutes is not None else a.vae or a.hunyuan3d),
               "train_minutes": a.train_minutes, "train_steps": steps, "setup_s": round(setup_s, 1),
               "vae_schedule": ({"lr": a.lr, "warmup": a.warmup} if a.train_minutes is not None and not a.vae
                                else None),
               "held_out": held_out}
    entry = record("decode", figures, path=a.results)
    print(f"recorded to {a.results}")
    return entry
