"""Time-capped stage training shared by the benchmarks that train their own models."""
from __future__ import annotations

from typing import Any, Sequence

import lightning as L

from fvdm.config import EXPERIMENTS, load_config
from fvdm.train import build_trainer


def time_cap(minutes: float) -> str:
    """Minutes as Lightning's "DD:HH:MM:SS" ``max_time``."""
    seconds = int(round(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def fit_capped(stage: str, stage_cls: type, overrides: Sequence[str]) -> tuple[Any, L.Trainer]:
    """Fit ``stage_cls`` from ``experiments/{stage}.yaml`` plus ``overrides`` with no logger; returns the module
    (back on the CPU, as ``fit`` leaves it) and the trainer."""
    cfg = load_config(stage_cls.Config, [str(EXPERIMENTS / f"{stage}.yaml")], list(overrides))
    L.seed_everything(cfg.trainer.seed, workers=True)
    module = stage_cls(cfg)
    trainer = build_trainer(cfg, logger=False)
    trainer.fit(module, datamodule=module.datamodule())
    return module, trainer
