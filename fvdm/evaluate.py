"""``fvdm eval``: reconstruction metrics of a VAE checkpoint (or Hunyuan3D-2 folder) on held-out shards."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fvdm.callbacks.reconstruction import evaluate
from fvdm.config import DataConfig
from fvdm.data.datamodule import ShapeDataModule
from fvdm.stages.checkpoints import load_pretrained_vae


def eval_checkpoint(checkpoint: str, data: str, out_dir: str | None = None, device: str | None = None,
                    batch_size: int = 4, num_surface: int = 4096, num_sharp: int = 0, num_points: int = 8192,
                    **settings: Any) -> dict[str, float]:
    """Evaluate the VAE in ``checkpoint`` on every sample of ``data`` and print the metrics as JSON."""
    vae = load_pretrained_vae(checkpoint)
    if vae.cfg.pc_sharpedge_size:  # the encoder splits its input on the configured pool sizes
        num_surface, num_sharp = vae.cfg.pc_size, vae.cfg.pc_sharpedge_size
    cfg = DataConfig(train=data, val=data, val_batch_size=batch_size, num_workers=0, num_surface=num_surface,
                     num_sharp=num_sharp, num_vol=num_points, num_near=num_points)
    loader = ShapeDataModule(cfg, images=False).val_dataloader()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(vae.to(device), loader, out_dir=out_dir, device=device, **settings)
    print(json.dumps(metrics, indent=1))
    if out_dir:
        Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
