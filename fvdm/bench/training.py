"""Time-capped stage training shared by the benchmarks that train their own models."""
from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch import Callback

from fvdm.config import EXPERIMENTS, load_config
from fvdm.train import build_trainer


def time_cap(minutes: float) -> str:
    """Minutes as Lightning's "DD:HH:MM:SS" ``max_time``."""
    seconds = int(round(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class WallClockCosine(Callback):
    """Learning rate = base * linear warm-up over ``warmup_steps`` * cosine over the wall clock, from 1 at the
    start of training to ``min_lr_ratio`` when ``seconds`` have passed.

    A step-based cosine needs the step count a time cap will allow, which depends on the device; this one ends
    with the cap whatever the throughput. It overwrites the optimizer's rates before every step (the stage's
    own scheduler should then be ``constant`` with no warm-up, so that ``initial_lr`` is the base rate).
    """

    def __init__(self, seconds: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1):
        self.seconds, self.warmup_steps, self.min_lr_ratio = float(seconds), int(warmup_steps), float(min_lr_ratio)
        self.start: Optional[float] = None

    def multiplier(self, step: int, elapsed: float) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        progress = min(1.0, max(0.0, elapsed / self.seconds))
        return warm * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.monotonic()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        elapsed = time.monotonic() - (self.start if self.start is not None else time.monotonic())
        m = self.multiplier(trainer.global_step, elapsed)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = group.get("initial_lr", group["lr"]) * m


def wall_clock_schedule(minutes: float, warmup_steps: int) -> tuple[list[str], WallClockCosine]:
    """The overrides that flatten a stage's own scheduler, and the ``WallClockCosine`` that then sets warm-up and
    cosine, ending with a ``minutes`` cap."""
    return ["optim.schedule=constant", "optim.warmup_steps=0"], WallClockCosine(minutes * 60, warmup_steps)


class CurvePrinter(Callback):
    """Prints, every ``every_n_steps``: the step, the seconds since the start of training, the learning rate of the
    last optimizer step (a ``WallClockCosine`` sets it before the step, the stage's scheduler resets it after), the
    mean and largest training loss and gradient norm (before clipping) over the interval, and the ``val/*``
    figures of the stage's last evaluation. The interval's largest values show a loss spike that one sampled loss
    would miss; they stay on the device between prints (no sync per step)."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self.start: Optional[float] = None
        self.sums: dict[str, torch.Tensor] = {}
        self.peaks: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.lr = float("nan")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.monotonic()

    def _track(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.peaks[name] = torch.maximum(self.peaks[name], value) if name in self.peaks else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.lr = optimizer.param_groups[0]["lr"]
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self._track("grad_norm", torch.nn.utils.get_total_norm(grads))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._track("loss", loss)
        step = trainer.global_step
        if step % self.every_n_steps or not self.counts:
            return
        stats = " ".join(f"{k} {self.sums[k] / self.counts[k]:.4f}/{self.peaks[k]:.4f}" for k in sorted(self.sums))
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        print(f"curve step {step} t {time.monotonic() - (self.start or 0):.0f}s lr {self.lr:.2e} (mean/max) {stats}"
              + "".join(f" {k} {v:.4f}" for k, v in sorted(val.items())), flush=True)
        self.sums, self.peaks, self.counts = {}, {}, {}


def fit_capped(stage: str, stage_cls: type, overrides: Sequence[str], callbacks: Sequence[Callback] = (),
               files: Sequence[str] = ()) -> tuple[Any, L.Trainer]:
    """Fit ``stage_cls`` from ``experiments/{stage}.yaml``, then ``files``, then ``overrides``, with no logger;
    returns the module (back on the CPU, as ``fit`` leaves it) and the trainer. ``callbacks`` join the
    trainer's own."""
    cfg = load_config(stage_cls.Config, [str(EXPERIMENTS / f"{stage}.yaml"), *files], list(overrides))
    L.seed_everything(cfg.trainer.seed, workers=True)
    module = stage_cls(cfg)
    trainer = build_trainer(cfg, logger=False)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=module.datamodule())
    return module, trainer
