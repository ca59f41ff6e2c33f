"""``fvdm sample``: images -> meshes with a diffusion-stage checkpoint (or a released DiT bundle), Euler
sampling with classifier-free guidance (or the guidance embedding) on the uniform grid, or on a consistency
student's phased grid, and the fast decoder."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml
from PIL import Image

from fvdm.consistency import phased_grid, turbo_grid
from fvdm.decoding.mesh import Mesh, decode_mesh
from fvdm.sampler import euler_sample
from fvdm.stages.base import CONFIG_KEY
from fvdm.stages.checkpoints import (CONSISTENCY_STAGES, is_deepspeed_checkpoint, load_diffusion,
                                     read_stored_config, resolve_checkpoint)


def read_image(path: str | Path) -> torch.Tensor:
    """[1, C, H, W] float in [0, 1]: RGB, or RGBA when the file has alpha (the conditioner recentres on it)."""
    try:
        img = Image.open(path)
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    except OSError as e:
        raise ValueError(f"{path}: cannot read image: {e}") from e
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def sampling_grid(checkpoint: str | Path, steps: int, grid: str = "auto") -> torch.Tensor | None:
    """The time grid for ``steps`` steps: ``euler`` (uniform; None), ``phased`` (a consistency student's phase
    edges), ``turbo`` (the released turbo scheduler's), or ``auto``: phased for consistency and adversarial
    checkpoints, turbo for released bundles with the consistency scheduler, else Euler."""
    checkpoint = resolve_checkpoint(checkpoint)
    if grid == "auto":
        path = checkpoint
        if path.is_dir() and not is_deepspeed_checkpoint(path):
            scheduler = (yaml.safe_load((path / "config.yaml").read_text()).get("scheduler") or {})
            grid = "turbo" if "Consistency" in str(scheduler.get("target", "")) else "euler"
        else:
            stored = yaml.safe_load(read_stored_config(path)[CONFIG_KEY])
            grid = "phased" if stored.get("stage") in CONSISTENCY_STAGES else "euler"
    if grid == "euler":
        return None
    if grid == "turbo":
        return turbo_grid(steps)
    if grid == "phased":
        stored = yaml.safe_load(read_stored_config(checkpoint)[CONFIG_KEY])
        return phased_grid(steps, int(stored.get("grid", {}).get("phases", 1)))
    raise ValueError(f"--grid: unknown '{grid}' (auto, euler, phased or turbo)")


@torch.no_grad()
def sample_meshes(checkpoint: str | Path, images: Sequence[str | Path], out_dir: str | Path, steps: int = 50,
                  guidance: float = 5.0, seed: int = 0, resolution: int = 256, method: str = "auto",
                  device: str | None = None, grid: str = "auto") -> list[Path]:
    """One mesh (PLY) per image, written to ``out_dir``; returns the paths."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    times = sampling_grid(checkpoint, steps, grid)
    dit, vae, conditioner = (m.to(device).eval() for m in load_diffusion(checkpoint))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(images):
        cond = conditioner(read_image(path).to(device))
        uncond = conditioner.unconditional(1, device, cond.dtype)
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(1, vae.cfg.num_latents, vae.cfg.embed_dim, generator=g).to(device)
        latents = euler_sample(dit, noise, cond, uncond, steps=steps, guidance=guidance, grid=times)
        mesh: Mesh = decode_mesh(vae, latents / vae.scale_factor, resolution=resolution, method=method)[0]
        target = out / f"{Path(path).stem}.ply"
        mesh.to_trimesh().export(target)
        print(f"{path} -> {target} ({len(mesh.faces)} faces, {steps} steps, guidance {guidance}, grid "
              f"{'uniform' if times is None else [round(float(u), 4) for u in times]})")
        written.append(target)
    return written
