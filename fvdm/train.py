"""``fvdm train``: resolve the config, build the stage and its data, and fit with MLflow tracking."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from fvdm.config import ConfigError, load_config, peek_stage, split_args
from fvdm.stages import get_stage


def resolve(args: Sequence[str]) -> Any:
    """CLI arguments (YAML files and key=value overrides) -> the typed config of the named stage."""
    files, overrides = split_args(args)
    stage_cls = get_stage(peek_stage(files, overrides))
    return load_config(stage_cls.Config, files, overrides)


def last_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / "checkpoints" / "last.ckpt"
    return path if path.exists() else None


def build_trainer(cfg: Any, logger: Any, manual_optimization: bool = False) -> L.Trainer:
    """The Trainer of a run; stages with manual optimization clip their own gradients."""
    t = cfg.trainer
    checkpoints = ModelCheckpoint(
        dirpath=cfg.run_dir / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_top_k=1,
        save_last=True,
    )
    return L.Trainer(
        max_steps=t.max_steps,
        max_time=t.max_time,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        gradient_clip_val=None if manual_optimization else t.gradient_clip_val,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        logger=logger,
        callbacks=[checkpoints] + ([LearningRateMonitor(logging_interval="step")] if logger else []),
        default_root_dir=str(cfg.run_dir),
        enable_progress_bar=True,
        num_sanity_val_steps=0,
    )


def train(args: Sequence[str], resume: bool = False) -> tuple[Any, L.Trainer]:
    """Train the stage a config names. With ``resume`` continue its run from ``last.ckpt``."""
    cfg = resolve(args)
    stage_cls = get_stage(cfg.stage)
    run_dir = cfg.run_dir
    ckpt = last_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise ConfigError(f"--resume: no checkpoint at {run_dir / 'checkpoints' / 'last.ckpt'}")
    from fvdm.tracking import make_logger, start_run

    L.seed_everything(cfg.trainer.seed, workers=True)
    logger = make_logger(cfg, run_dir, resume=resume)
    start_run(logger, cfg, run_dir)
    module = stage_cls(cfg)
    datamodule = module.datamodule()
    trainer = build_trainer(cfg, logger, manual_optimization=not module.automatic_optimization)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    return module, trainer
