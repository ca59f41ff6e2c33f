"""``fvdm bench sensitivity``: how far a teacher's CFG meshes move when its velocity changes, to read a
guidance student's IoU against the teacher (issue 12's bar: 0.9).

From the same noise and image, the reference is the teacher's ``--steps``-step Euler sample at guidance
``--guidance``; each variant changes one thing and reports the occupancy IoU of its decoded field against the
reference's at uniform points in the normalized cube:

- ``w X``: guidance X everywhere (``w 1`` is the conditional velocity: the student at step 0);
- ``steps N``: twice the steps (the discretisation's own share);
- ``random r`` (and ``random r t<0.4``): a fresh random direction of r times the velocity's norm added at every
  step (only before t = 0.4): unsystematic error of that size;
- ``band_at_w X``: guidance X only on the k-th fifth of the trajectory [k/5, (k+1)/5), per k.

Plus ``teacher_vs_reconstruction``: the reference against the VAE's reconstruction of the shape.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Optional

import torch

from fvdm.bench.results import record
from fvdm.config import DataConfig
from fvdm.data.datamodule import ShapeDataModule
from fvdm.flow import euler_step, time_grid
from fvdm.metrics.reconstruction import OccupancyIoU
from fvdm.sampler import euler_sample, guided_velocity
from fvdm.stages.checkpoints import load_diffusion
from fvdm.stages.diffusion import occupancy_iou

BANDS = 5


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


@torch.no_grad()
def perturbed_sample(dit: torch.nn.Module, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                     steps: int, guidance: Callable[[float], float], kick: float = 0.0, kick_until: float = 1.0,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Euler from ``noise`` [B, N, C] at t = 0 to t = 1 with guidance ``guidance(t)``; with ``kick`` > 0, each step
    before ``kick_until`` adds a fresh random direction of ``kick`` times the velocity's norm (per sample)."""
    grid = time_grid(steps)
    x = noise
    for i in range(steps):
        t0, t1 = float(grid[i]), float(grid[i + 1])
        t = torch.full((x.shape[0],), t0, device=x.device)
        v = guided_velocity(dit, x, t, cond, uncond, guidance(t0)).float()
        if kick > 0 and t0 < kick_until:
            u = torch.randn(v.shape, generator=generator).to(v.device)  # drawn on the CPU: the same on any device
            scale = kick * v.flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)  # [B]
            v = v + scale.view(-1, 1, 1) * u
        x = euler_step(x, v.to(x.dtype), t0, t1)
    return x


def variants(a: argparse.Namespace) -> dict[str, dict]:
    """Name -> keyword arguments of ``perturbed_sample`` (beside the reference's)."""
    w = a.guidance
    out: dict[str, dict] = {f"w {x:g}": {"guidance": lambda t, x=x: x} for x in floats(a.scales)}
    out[f"steps {2 * a.steps}"] = {"steps": 2 * a.steps}
    for r in floats(a.random):
        out[f"random {r:g}"] = {"kick": r}
        out[f"random {r:g} t<0.4"] = {"kick": r, "kick_until": 0.4}
    for x in floats(a.band_scales):
        for k in range(BANDS):
            out[f"band {k} at w {x:g}"] = {"guidance": lambda t, x=x, k=k: x if int(t * BANDS) == k else w}
    return out


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="fvdm bench sensitivity", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="quickstart/runs/flow/checkpoints/last.ckpt",
                   help="the teacher: a flow checkpoint (or any load_diffusion source)")
    p.add_argument("--data", default="quickstart/data/val", help="shards with renders (every sample once)")
    p.add_argument("--shapes", type=int, default=32)
    p.add_argument("--render-index", type=int, default=0, help="the condition render (0: synth's canonical view)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--scales", default="1,3,4.5,5.5", help="guidance everywhere instead of --guidance")
    p.add_argument("--random", default="0.05,0.1,0.2", help="random kicks, as a share of the velocity's norm")
    p.add_argument("--band-scales", default="1,3", help="guidance on one fifth of the trajectory")
    p.add_argument("--points", type=int, default=8192, help="uniform points per shape for the IoU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available (fp32 throughout)")
    p.add_argument("--results", default="benchmarks/results.json")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher, vae, conditioner = (m.to(device).eval() for m in load_diffusion(a.checkpoint))
    data = DataConfig(train=a.data, val=a.data, val_batch_size=8, num_workers=0, num_surface=vae.cfg.pc_size,
                      num_sharp=vae.cfg.pc_sharpedge_size, num_vol=1, num_near=0, render_index=a.render_index)
    runs = variants(a)
    ious = {name: OccupancyIoU().to(device) for name in ["teacher_vs_reconstruction", *runs]}
    shapes = 0
    with torch.no_grad():
        for i, batch in enumerate(ShapeDataModule(data, images=True).val_dataloader()):
            b = min(len(batch["key"]), a.shapes - shapes)
            if b <= 0:
                break
            g = torch.Generator().manual_seed(a.seed * 100_003 + i)
            cond = conditioner(batch["image"][:b].to(device))
            uncond = conditioner.unconditional(b, cond.device, cond.dtype)
            noise = torch.randn(b, vae.cfg.num_latents, vae.cfg.embed_dim, generator=g).to(device)
            points = (torch.rand(b, a.points, 3, generator=g) * 2 - 1).to(device)
            reference = euler_sample(teacher, noise, cond, uncond, steps=a.steps, guidance=a.guidance)
            reference = vae.query(vae.decode(reference / vae.scale_factor), points).float()
            recon = vae.encode(batch["surface"][:b].to(device), sample_posterior=False) * vae.scale_factor
            occupancy_iou(vae, recon, points, reference, ious["teacher_vs_reconstruction"])
            for name, kwargs in runs.items():
                kwargs = {"steps": a.steps, "guidance": lambda t: a.guidance, **kwargs}
                sample = perturbed_sample(teacher, noise, cond, uncond, generator=g, **kwargs)
                occupancy_iou(vae, sample, points, reference, ious[name])
            shapes += b
    if not shapes:
        raise SystemExit(f"fvdm bench sensitivity: no shapes in {a.data}")
    iou = {name: round(float(metric.compute()), 4) for name, metric in ious.items()}
    for name, value in iou.items():
        print(f"{name:<28}{value:8.4f}")
    bands = {f"band_at_w{x:g}": [iou.pop(f"band {k} at w {x:g}") for k in range(BANDS)] for x in floats(a.band_scales)}
    figures = {"checkpoint": a.checkpoint, "data": a.data, "shapes": shapes, "points": a.points,
               "reference": f"{a.steps} Euler steps, CFG w = {a.guidance:g}",
               "teacher_vs_reconstruction": iou.pop("teacher_vs_reconstruction"), "iou_vs_reference": iou, **bands,
               "device_type": device.type, "minutes": (time.perf_counter() - t0) / 60}
    entry = record("guidance_sensitivity", figures, path=a.results)
    print(f"recorded to {a.results}")
    return entry
