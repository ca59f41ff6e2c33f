"""``fvdm train``: resolve the config, build the stage and its data, and fit with MLflow tracking."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from fvdm.config import ConfigError, load_config, peek_stage, split_args
from fvdm.stages import get_stage
from fvdm.strategy import cpu_precision, training_strategy


def resolve(args: Sequence[str]) -> Any:
    """CLI arguments (YAML files and key=value overrides) -> the typed config of the named stage."""
    files, overrides = split_args(args)
    stage_cls = get_stage(peek_stage(files, overrides))
    return load_config(stage_cls.Config, files, overrides)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newer (by stored ``global_step``) of ``checkpoints/last.ckpt`` and the newest ``hpc_ckpt_<n>.ckpt``
    that :class:`SlurmRequeue` saves in the run dir; None when there is neither."""
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rpartition("_")[2]))
    found = [p for p in [run_dir / "checkpoints" / "last.ckpt", *hpc[-1:]] if p.exists()]

    def global_step(path: Path) -> int:  # mmap: reads the metadata, not the weights
        if path.is_dir():  # DeepSpeed: rank 0's model-states file (ZeRO-3 prefixes it with zero_pp_rank_0_)
            path = sorted((path / "checkpoint").glob("*mp_rank_00_model_states.pt"))[0]
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"]

    return max(found, key=global_step, default=None)


class SlurmRequeue(Callback):
    """On ``signum`` (SLURM's ``--signal`` before the time limit) save ``hpc_ckpt_<n>.ckpt`` in the run dir at the
    end of the current step, end training there, and requeue the job with ``scontrol requeue`` once the run has
    finished logging (a requeue kills the job's processes).

    Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves inside the signal handler, wherever in
    the step the signal lands: with several ranks the save's barrier can pair with another rank's gradient
    all-reduce and hang (seen with 2 ranks here; Lightning issue #21406), and the saved loop state can be a step
    off. Here the handler only sets a flag, and the ranks agree on it after every step (one tiny all-reduce)."""

    def __init__(self, signum: signal.Signals) -> None:
        self.signum = signum
        self.received = False
        self.saved = False
        self.previous: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.previous = signal.signal(self.signum, self.receive)  # before DeepSpeed init and checkpoint loading

    def receive(self, signum: int, frame: Any) -> None:
        self.received = True

    @property
    def requeued(self) -> bool:
        """This attempt has saved its HPC checkpoint and ends for the requeue (callbacks skip end-of-run work)."""
        return self.saved

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.saved or not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        run_dir = Path(trainer.default_root_dir)
        older = list(run_dir.glob("hpc_ckpt_*.ckpt"))
        n = max((int(p.stem.rpartition("_")[2]) for p in older), default=0) + 1
        trainer.save_checkpoint(trainer.strategy.broadcast(run_dir / f"hpc_ckpt_{n}.ckpt"))  # rank 0's name, all ranks
        if trainer.is_global_zero:
            for path in older:  # superseded by the one just written
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.saved = True
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step  # end here; should_stop would first validate

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
        if self.saved and trainer.is_global_zero:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
            rank_zero_info(f"fvdm: saved {trainer.global_step} steps; requeueing SLURM job {job}")
            subprocess.run(["scontrol", "requeue", job], check=True)  # a failure fails the job: no afterok


def best_checkpoint(cfg: Any) -> list[ModelCheckpoint]:
    """With ``trainer.monitor`` set: a ModelCheckpoint keeping ``checkpoints/best.ckpt`` by that metric (what
    ``init_from=RUN_DIR:best`` loads). It checks after each validation, or every ``eval.every_n_steps`` in the
    VAE stages, whose metrics come from the ReconstructionEval callback at that interval."""
    t = cfg.trainer
    if t.monitor is None:
        return []
    if t.monitor_mode not in ("max", "min"):
        raise ConfigError(f"trainer.monitor_mode: '{t.monitor_mode}' (max or min)")
    every = getattr(getattr(cfg, "eval", None), "every_n_steps", None)
    return [ModelCheckpoint(dirpath=cfg.run_dir / "checkpoints", filename="best", monitor=t.monitor,
                            mode=t.monitor_mode, save_top_k=1, auto_insert_metric_name=False,
                            every_n_train_steps=every, enable_version_counter=False)]


def build_trainer(cfg: Any, logger: Any) -> L.Trainer:
    """The Trainer of a run: checkpoints every ``checkpoint_every_n_steps`` plus ``last``, strategy from config."""
    t = cfg.trainer
    strategy, precision = training_strategy(t, cfg.data.batch_size)
    precision = cpu_precision(precision, t.accelerator)
    # under SLURM: ranks from SLURM_*, and SlurmRequeue instead of Lightning's in-handler requeue
    slurm = SLURMEnvironment(auto_requeue=False, requeue_signal=signal.SIGUSR1) if SLURMEnvironment.detect() else None
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
        strategy=strategy,
        precision=precision,
        plugins=[slurm] if slurm else [],
        gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        logger=logger,
        callbacks=[checkpoints, *best_checkpoint(cfg)]
        + ([LearningRateMonitor(logging_interval="step")] if logger else [])
        + ([SlurmRequeue(slurm.requeue_signal)] if slurm else []),
        default_root_dir=str(cfg.run_dir),
        enable_progress_bar=True,
        num_sanity_val_steps=0,
    )


def train(args: Sequence[str], resume: bool | str = False) -> tuple[Any, L.Trainer]:
    """Train the stage a config names. ``resume=True`` continues its run from :func:`last_checkpoint` (an error
    without one); ``"auto"`` continues when there is one and starts fresh otherwise (a SLURM job or its requeue)."""
    cfg = resolve(args)
    stage_cls = get_stage(cfg.stage)
    run_dir = cfg.run_dir
    ckpt = last_checkpoint(run_dir) if resume else None
    if resume is True and ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir} (checkpoints/last.ckpt or hpc_ckpt_<n>.ckpt)")
    if resume == "auto":
        rank_zero_info(f"fvdm: resuming from {ckpt}" if ckpt else f"fvdm: no checkpoint in {run_dir}, starting fresh")
    L.seed_everything(cfg.trainer.seed, workers=True)
    logger = False
    # only global rank 0 tracks: ranks started together (srun) would race on the store; Lightning's own launcher
    # numbers ranks per node
    if cfg.tracking.enabled and rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        from fvdm.tracking import make_logger, start_run

        logger = make_logger(cfg, run_dir, resume=ckpt is not None)
        start_run(logger, cfg, run_dir)
    module = stage_cls(cfg)
    datamodule = module.datamodule()
    trainer = build_trainer(cfg, logger)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    return module, trainer
