"""The ``fvdm`` command. Each subcommand is a parser plus one small function that dispatches into the package."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from fvdm.config import ConfigError
from fvdm.interop.hunyuan3d import InteropError


def _add_counts(p: argparse.ArgumentParser) -> None:
    from fvdm.data.sampling import SampleCounts

    for f in fields(SampleCounts):
        if f.type in ("int", "float", int, float):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=int if "int" in str(f.type) else float, default=None,
                           help=f"samples per shape: {f.name} (default {f.default})")


def _counts(args: argparse.Namespace):
    from fvdm.data.sampling import SampleCounts

    given = {f.name: getattr(args, f.name) for f in fields(SampleCounts) if getattr(args, f.name, None) is not None}
    return SampleCounts(**given)


def cmd_synth(args: argparse.Namespace) -> int:
    from fvdm.data.synth import run_synth

    run_synth(args.out, num=args.num, seed=args.seed, val_fraction=args.val_fraction, counts=_counts(args),
              workers=args.workers, shard_size=args.shard_size)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from fvdm.data.prepare import run_prepare

    report = run_prepare(args.meshes, args.out, counts=_counts(args), workers=args.workers,
                         shard_size=args.shard_size, watertight=args.watertight, seed=args.seed,
                         max_faces=args.max_faces)
    return 0 if report.succeeded > 0 else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from fvdm.data.inspect import inspect_shards

    stats = inspect_shards(args.shards)
    print(stats.table())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fvdm.train import train

    train(args.config, resume=args.resume)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fvdm.evaluate import eval_checkpoint

    eval_checkpoint(args.checkpoint, args.data, out_dir=args.out, device=args.device, batch_size=args.batch_size,
                    num_surface=args.num_surface, num_points=args.num_points, resolution=args.resolution,
                    num_mesh_shapes=args.num_mesh_shapes, max_batches=args.max_batches)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from fvdm.interop.hunyuan3d import HY2_TARGET, HY21_TARGET, export_dit, export_vae
    from fvdm.stages.checkpoints import holds_dit, load_diffusion, load_pretrained_vae, save_vae_checkpoint

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if holds_dit(args.src):
        if args.to != "hunyuan3d":
            raise ConfigError(f"{args.src}: a DiT converts --to hunyuan3d only (stages take a released DiT folder "
                              "directly as init_from)")
        dit, vae, conditioner = load_diffusion(args.src)
        if conditioner.cfg.kind != "dinov2":
            print(f"note: the '{conditioner.cfg.kind}' image encoder has no Hunyuan3D-2 counterpart and is left out")
            conditioner = None
        print(f"wrote {export_dit(dit, args.dst, vae=vae, conditioner=conditioner, dtype=dtype)}")
        return 0
    vae = load_pretrained_vae(args.src)
    if args.to == "fvdm":
        print(f"wrote {save_vae_checkpoint(vae, args.dst)}")
    else:
        target = {"hy2": HY2_TARGET, "hy21": HY21_TARGET}[args.target]
        print(f"wrote {export_vae(vae, args.dst, dtype=dtype, target=target)}")
    return 0


def cmd_cache_latents(args: argparse.Namespace) -> int:
    import json

    from fvdm.data.latents import cache_latents

    index = cache_latents(args.vae, args.data, args.out, batch_size=args.batch_size, num_surface=args.num_surface,
                          num_sharp=args.num_sharp, scale=args.scale, scale_shapes=args.scale_shapes,
                          device=args.device, shard_size=args.shard_size)
    print(json.dumps(index, indent=1))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from fvdm.generate import sample_meshes

    sample_meshes(args.checkpoint, args.image, args.out, steps=args.steps, guidance=args.guidance, seed=args.seed,
                  resolution=args.resolution, method=args.method, device=args.device, grid=args.grid)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    bench = importlib.import_module(f"fvdm.bench.{args.what}")
    bench.main(args.rest)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fvdm.compare import compare

    print(compare(args.runs, args.metrics, experiment=args.experiment, uri=args.tracking_uri, run_root=args.run_root,
                  plot=args.plot, log_to=args.log_to))
    print(f"wrote {args.plot}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from fvdm.quickstart import quickstart

    quickstart(args.root, scale=args.scale)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvdm", description="FlashVDM training framework")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate the embedded procedural shape set as shards")
    p.add_argument("--num", type=int, required=True, help="number of shapes (train + val)")
    p.add_argument("--out", required=True, help="output directory (train/ and val/ shards inside)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard")
    _add_counts(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="turn raw meshes (OBJ/PLY/STL/OFF/GLB) into shards")
    p.add_argument("--meshes", required=True, nargs="+", help="files, directories or globs")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--watertight", action="store_true", help="sample the training surface from a watertight remesh")
    p.add_argument("--max-faces", type=int, default=2_000_000, help="skip (and report) larger meshes")
    p.add_argument("--seed", type=int, default=0)
    _add_counts(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("inspect", help="shard statistics: samples, points, SDF ranges, failures")
    p.add_argument("shards", help="shard path, brace pattern or directory")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train a stage: fvdm train CONFIG [CONFIG ...] [key=value ...]")
    p.add_argument("config", nargs="+", help="YAML files merged in order, then key=value overrides")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"], metavar="auto",
                   help="continue this run from its newest checkpoint (an error without one); --resume auto: "
                        "continue when there is one, else start fresh (SLURM jobs and their requeues)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="reconstruction metrics of a VAE checkpoint on shards")
    p.add_argument("checkpoint", help="stage checkpoint (.ckpt) or Hunyuan3D-2 VAE folder")
    p.add_argument("--data", required=True, help="shards: path, directory or brace pattern")
    p.add_argument("--out", default=None, help="directory for meshes, preview and metrics.json")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-surface", type=int, default=4096, help="encoder input points per shape")
    p.add_argument("--num-points", type=int, default=8192, help="volume and near-surface points per shape")
    p.add_argument("--resolution", type=int, default=128, help="marching-cubes resolution")
    p.add_argument("--num-mesh-shapes", type=int, default=4, help="shapes decoded to meshes")
    p.add_argument("--max-batches", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="checkpoints between fvdm and the released Hunyuan3D-2 layout")
    p.add_argument("src", help="fvdm checkpoint (.ckpt: a VAE, or a DiT with its VAE) or Hunyuan3D-2 VAE folder")
    p.add_argument("dst", help="output: a folder (--to hunyuan3d) or a .ckpt file (--to fvdm)")
    p.add_argument("--to", choices=["hunyuan3d", "fvdm"], required=True)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="weights dtype for hunyuan3d")
    p.add_argument("--target", choices=["hy2", "hy21"], default="hy2", help="config target class to write")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("cache-latents", help="encode shards once with a frozen VAE into latent shards")
    p.add_argument("--vae", required=True, help="vae/decoder_ft checkpoint or Hunyuan3D-2 VAE folder with an encoder")
    p.add_argument("--data", required=True, help="shape shards: path, directory or brace pattern")
    p.add_argument("--out", required=True, help="output directory (latents-*.tar and latents.json)")
    p.add_argument("--scale", default="auto", help="auto (1 / std of the first shapes' latents), vae, or a number")
    p.add_argument("--scale-shapes", type=int, default=256, help="shapes the auto scale is estimated on")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-surface", type=int, default=20480, help="encoder input points (the VAE's pools win)")
    p.add_argument("--num-sharp", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=256, help="shapes per latent shard")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_cache_latents)

    p = sub.add_parser("sample", help="meshes from condition images with a diffusion checkpoint")
    p.add_argument("--checkpoint", required=True, help="flow/guidance checkpoint (.ckpt) or Hunyuan3D-2 DiT folder")
    p.add_argument("--image", required=True, nargs="+", help="condition images (RGB on white, or RGBA)")
    p.add_argument("--out", default="samples", help="directory for the PLY meshes")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (= model evaluations)")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance scale w")
    p.add_argument("--grid", choices=["auto", "euler", "phased", "turbo"], default="auto",
                   help="step times: auto = phased for consistency students, turbo for released turbo bundles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=256, help="marching-cubes resolution")
    p.add_argument("--method", choices=["auto", "dense", "hierarchical", "flash"], default="auto")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bench", help="benchmarks writing to benchmarks/results.json")
    p.add_argument("what", choices=["data", "vae", "decode", "query", "quickstart", "fewstep", "guidance",
                                    "sensitivity", "deepspeed"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="a table and metric curves across MLflow runs (the stages of a pipeline)")
    p.add_argument("runs", nargs="*", help="run ids or run names (none: every run of --experiment)")
    p.add_argument("--experiment", default=None, help="experiment name: its runs, or where the given runs are")
    p.add_argument("--metrics", nargs="+", required=True, help="metric keys, e.g. train/loss val/v_iou")
    store = p.add_mutually_exclusive_group()
    store.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the run root's store)")
    store.add_argument("--run-root", default="runs", help="run root holding mlflow.db")
    p.add_argument("--plot", default="compare.png", help="PNG path: one subplot per metric, a curve per run")
    p.add_argument("--log-to", default=None, help="run id or name that gets the table and the plot as artifacts")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("quickstart", help="the main job on the embedded default data set")
    p.add_argument("--root", default="quickstart")
    p.add_argument("--scale", type=float, default=None,
                   help="fraction of every stage's tiny-preset steps (default: 1 for the VAE stages, 0.25 for the "
                        "diffusion stages; 1: the full-size chain of fvdm bench quickstart, about 30 minutes on "
                        "2 idle CPU cores)")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"fvdm: config error: {e}", file=sys.stderr)
        return 2
    except InteropError as e:
        print(f"fvdm: checkpoint error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
