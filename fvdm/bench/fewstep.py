"""``fvdm bench fewstep``: the paper's Fig. 12 as numbers on the embedded default. Every model samples from the
same noise and held-out image; each sample is compared with the original teacher's 50-step CFG sample by
occupancy IoU (on the shape's uniform volume points) and Chamfer distance (between meshes extracted at
``--resolution``), at 1, 2, 3 and 5 steps.

Rows: the teacher's own Euler samples; the CFD chain (GD + CFD, + phase-1, + adversarial) of a quickstart run
(``--root``); and the three ablation switches trained here from the same starting points with the tiny
consistency preset: no guidance warm-up (CFD from the CFG teacher), L2 instead of pseudo-Huber, no EMA.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fvdm.bench.results import record
from fvdm.callbacks.reconstruction import mesh_samples
from fvdm.config import EXPERIMENTS
from fvdm.consistency import phased_grid
from fvdm.data.datamodule import ShapeDataModule
from fvdm.decoding.mesh import decode_mesh
from fvdm.metrics.reconstruction import ChamferDistance, OccupancyIoU
from fvdm.sampler import euler_sample
from fvdm.stages.checkpoints import load_diffusion
from fvdm.train import resolve, train

CHAIN = ("consistency", "consistency_phase1", "adversarial")
ABLATIONS = {"no_guidance_warmup": ("flow", ()), "l2_loss": ("guidance", ("loss=l2",)),
             "no_ema": ("guidance", ("ema=false",))}


def _train_ablation(name: str, root: Path, init: str, extra: tuple[str, ...]) -> Path:
    data = root / "data"
    train([str(EXPERIMENTS / "consistency.yaml"), str(EXPERIMENTS / "presets" / "tiny-consistency.yaml"),
           f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"run_root={root / 'runs'}",
           f"init_from={root / 'runs' / init / 'checkpoints' / 'last.ckpt'}", f"name=ablation_{name}",
           f"latents={data / 'latents'}",
           "tracking.experiment=fewstep", "trainer.val_every_n_steps=1000000", *extra])
    return root / "runs" / f"ablation_{name}" / "checkpoints" / "last.ckpt"


def _phases(ckpt: Path) -> int:
    import yaml

    from fvdm.stages.base import CONFIG_KEY
    from fvdm.stages.checkpoints import read_checkpoint

    return int(yaml.safe_load(read_checkpoint(ckpt)[CONFIG_KEY])["grid"]["phases"])


@torch.no_grad()
def few_step_table(root: Path, students: dict[str, Path], steps: tuple[int, ...], resolution: int,
                   max_batches: int, guidance: float = 5.0) -> dict[str, dict[str, float]]:
    """{row: {"iou_k", "chamfer_k"}} over ``max_batches`` validation batches of the quickstart data."""
    teacher, vae, conditioner = (m.eval() for m in load_diffusion(root / "runs" / "flow" / "checkpoints" /
                                                                   "last.ckpt"))
    models = {name: (load_diffusion(path)[0].eval(), _phases(path)) for name, path in students.items()}
    cfg = resolve([str(EXPERIMENTS / "flow.yaml"), str(EXPERIMENTS / "presets" / "tiny-flow.yaml"),
                   f"data.train={root / 'data' / 'train'}", f"data.val={root / 'data' / 'val'}", "vae_from=x"]).data
    rows = ["teacher", *models]
    iou = {(r, k): OccupancyIoU() for r in rows for k in steps}
    chamfer = {(r, k): ChamferDistance() for r in rows for k in steps}

    def surface(latents: torch.Tensor) -> list[torch.Tensor]:
        meshes = decode_mesh(vae, latents / vae.scale_factor, resolution=resolution, method="dense")
        return [mesh_samples(m, 4096, seed=0, device=torch.device("cpu")) for m in meshes]

    def field(latents: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return vae.query(vae.decode(latents / vae.scale_factor), points).float()

    for i, batch in enumerate(ShapeDataModule(cfg).val_dataloader()):
        if i >= max_batches:
            break
        cond = conditioner(batch["image"])
        uncond = conditioner.unconditional(cond.shape[0], cond.device, cond.dtype)
        g = torch.Generator().manual_seed(i)
        noise = torch.randn(cond.shape[0], vae.cfg.num_latents, vae.cfg.embed_dim, generator=g)
        points = batch["vol"][..., :3]
        reference = euler_sample(teacher, noise, cond, uncond, steps=50, guidance=guidance)
        ref_field, ref_surface = field(reference, points), surface(reference)
        for k in steps:
            samples = {"teacher": euler_sample(teacher, noise, cond, uncond, steps=k, guidance=guidance)}
            for name, (student, phases) in models.items():
                samples[name] = euler_sample(student, noise, cond, None, guidance=guidance,
                                             grid=phased_grid(k, phases))
            for row, latents in samples.items():
                iou[row, k].update(field(latents, points), ref_field)
                chamfer[row, k].update(surface(latents), ref_surface)
    return {row: {**{f"iou_{k}": float(iou[row, k].compute()) for k in steps},
                  **{f"chamfer_{k}": float(chamfer[row, k].compute()) for k in steps}} for row in rows}


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="fvdm bench fewstep")
    p.add_argument("--root", default="quickstart", help="a finished quickstart root (data/ and runs/)")
    p.add_argument("--steps", default="1,2,3,5")
    p.add_argument("--resolution", type=int, default=64, help="marching cubes for Chamfer")
    p.add_argument("--max-batches", type=int, default=3, help="validation batches (8 shapes each)")
    p.add_argument("--skip-ablations", action="store_true", help="only the quickstart chain")
    p.add_argument("--results", default="benchmarks/results.json")
    a = p.parse_args(argv)
    root = Path(a.root)
    t0 = time.perf_counter()
    students = {name: root / "runs" / name / "checkpoints" / "last.ckpt" for name in CHAIN}
    missing = [str(path) for path in students.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"fvdm bench fewstep: run the quickstart first; missing {', '.join(missing)}")
    if not a.skip_ablations:
        for name, (init, extra) in ABLATIONS.items():
            students[f"ablation_{name}"] = _train_ablation(name, root, init, extra)
    steps = tuple(int(k) for k in a.steps.split(","))
    table = few_step_table(root, students, steps, a.resolution, a.max_batches)
    for row, values in table.items():
        print(f"{row:<34}" + "".join(f"{values[f'iou_{k}']:>8.3f}" for k in steps) + "   chamfer " +
              "".join(f"{values[f'chamfer_{k}']:>8.4f}" for k in steps))
    entry = record("fewstep", {"minutes": (time.perf_counter() - t0) / 60, "steps": list(steps),
                               "reference": "original teacher, 50 Euler steps, CFG 5.0", "rows": table},
                   path=a.results)
    return entry
