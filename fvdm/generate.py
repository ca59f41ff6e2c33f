"""``fvdm sample``: images -> meshes with a diffusion-stage checkpoint (or a released DiT bundle), Euler
sampling with classifier-free guidance (or the guidance embedding) and the fast decoder."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from fvdm.decoding.mesh import Mesh, decode_mesh
from fvdm.sampler import euler_sample
from fvdm.stages.checkpoints import load_diffusion


def read_image(path: str | Path) -> torch.Tensor:
    """[1, C, H, W] float in [0, 1]: RGB, or RGBA when the file has alpha (the conditioner recentres on it)."""
    try:
        img = Image.open(path)
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    except OSError as e:
        raise ValueError(f"{path}: cannot read image: {e}") from e
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


@torch.no_grad()
def sample_meshes(checkpoint: str | Path, images: Sequence[str | Path], out_dir: str | Path, steps: int = 50,
                  guidance: float = 5.0, seed: int = 0, resolution: int = 256, method: str = "auto",
                  device: str | None = None) -> list[Path]:
    """One mesh (PLY) per image, written to ``out_dir``; returns the paths."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dit, vae, conditioner = (m.to(device).eval() for m in load_diffusion(checkpoint))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(images):
        cond = conditioner(read_image(path).to(device))
        uncond = conditioner.unconditional(1, device, cond.dtype)
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(1, vae.cfg.num_latents, vae.cfg.embed_dim, generator=g).to(device)
        latents = euler_sample(dit, noise, cond, uncond, steps=steps, guidance=guidance)
        mesh: Mesh = decode_mesh(vae, latents / vae.scale_factor, resolution=resolution, method=method)[0]
        target = out / f"{Path(path).stem}.ply"
        mesh.to_trimesh().export(target)
        print(f"{path} -> {target} ({len(mesh.faces)} faces, {steps} steps, guidance {guidance})")
        written.append(target)
    return written
