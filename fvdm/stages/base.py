"""What every training stage shares: optimizer from config, frozen modules, config stored in checkpoints."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from omegaconf import OmegaConf

from fvdm.config import to_yaml

CONFIG_KEY = "fvdm_config"  # the resolved stage config, stored as YAML in every checkpoint


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and a constant or cosine schedule."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio * lr at trainer.max_steps)
    min_lr_ratio: float = 0.1


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: for teachers, frozen encoders, EMA targets and discriminator backbones."""
    module.eval()
    module.requires_grad_(False)
    return module


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, max_steps: int) -> dict[str, Any]:
    """AdamW over ``params`` plus the per-step LR multiplier, in Lightning's optimizer-config form."""
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule: unknown schedule '{cfg.schedule}' (constant or cosine)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)

    def multiplier(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Stage(L.LightningModule):
    """Base LightningModule: holds the typed config and writes it into every checkpoint."""

    Config: ClassVar[type]

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = to_yaml(self.cfg)


def config_from_checkpoint(checkpoint: dict[str, Any], schema: type) -> Any:
    """Rebuild the typed stage config stored in a checkpoint."""
    if CONFIG_KEY not in checkpoint:
        raise ValueError("checkpoint has no fvdm config: was it written by an fvdm stage?")
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(checkpoint[CONFIG_KEY]))
    return OmegaConf.to_object(merged)
