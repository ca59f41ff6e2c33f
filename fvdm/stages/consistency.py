"""``consistency`` stage (paper 3.3, consistency flow distillation): a multiphase consistency student on the
flow ODE, PCM adapted to fvdm's convention (``fvdm.consistency`` holds the grid and the loss).

One step, per sample: a grid index j, x_t = t x1 + (1 - t) eps; one teacher Euler step to t' = t + 1/N with
guidance fixed at w; the student maps x_t to its phase edge s, y_S = x_t + (s - t) f(x_t, t); the target
network maps the teacher's point to the same edge, y_T = x' + (s - t') f_tgt(x', t'); pseudo-Huber (c = 1e-3)
or L2 between them. The target is an EMA of the student (decay 0.999, held in fp32, outside the optimizer),
or with ``ema: false`` the student itself under no-grad (PCM).

Initialisation and teacher: ``init_from`` a ``guidance`` checkpoint (default: student, target and teacher all
start from the guidance-distilled model, which the teacher runs in one pass at w), a ``consistency``
checkpoint (the phase-1 finetune: ``grid.phases: 1``; its stored teacher is kept), or a ``flow`` checkpoint
(ablation "no guidance warm-up": the student gets a zero-initialised guidance embedding and the teacher is
the original model with explicit CFG). ``teacher_from`` overrides the teacher, e.g. the original CFG model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING

from fvdm.config import ConfigError, RunConfig
from fvdm.consistency import PhaseGrid, phased_grid, pseudo_huber
from fvdm.flow import euler_step, interpolate
from fvdm.metrics.reconstruction import OccupancyIoU
from fvdm.sampler import euler_sample, guided_velocity
from fvdm.stages.base import OptimConfig, ema_update, freeze
from fvdm.stages.checkpoints import load_diffusion, load_teacher
from fvdm.stages.diffusion import GenerationEvalConfig, LatentDiffusionStage


@dataclass
class FewStepEvalConfig(GenerationEvalConfig):
    """Student at each of ``student_steps`` (phased grid) and the teacher's own Euler samples at the same
    counts, all against the teacher's ``steps``-step samples from the same noise and condition."""

    student_steps: list[int] = field(default_factory=lambda: [1, 2, 3, 5])


@dataclass
class ConsistencyStageConfig(RunConfig):
    stage: str = "consistency"
    init_from: str = MISSING  # guidance / consistency / flow checkpoint, or a released DiT bundle
    teacher_from: Optional[str] = None  # None: init_from's consistency teacher, else the init model itself
    latents: Optional[str] = None  # latent shards from fvdm cache-latents instead of encoding data.train
    grid: PhaseGrid = field(default_factory=PhaseGrid)
    guidance: float = 5.0  # w given to the teacher and the student
    loss: str = "huber"  # huber | l2
    huber_c: float = 1e-3
    ema: bool = True  # false: the target is the student itself under no-grad (PCM)
    ema_decay: float = 0.999
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, eps=1e-6, weight_decay=0.01))
    eval: FewStepEvalConfig = field(default_factory=FewStepEvalConfig)


class ConsistencyDistillation(LatentDiffusionStage):
    """Student ``dit`` (guidance-embedded), EMA ``target``, frozen ``teacher``."""

    Config = ConsistencyStageConfig

    def __init__(self, cfg: ConsistencyStageConfig):
        super().__init__(cfg)
        cfg.grid.validate()
        if cfg.loss not in ("huber", "l2"):
            raise ConfigError(f"loss: unknown '{cfg.loss}' (huber or l2)")
        if not 0 <= cfg.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {cfg.ema_decay}")
        student, vae, conditioner = load_diffusion(cfg.init_from)
        if not student.cfg.guidance_embed:
            student.add_guidance_embedding()  # ablation: CFD straight from the CFG teacher
        self.set_models(student, vae, conditioner)
        self.hold("teacher", freeze(load_teacher(cfg.teacher_from or cfg.init_from)))
        self.hold("target", freeze(copy.deepcopy(student).float()) if cfg.ema else None)
        self.prepare_dits()
        self.check_latent_cache()
        self.few_step = torch.nn.ModuleDict({
            f"{who}{k}": OccupancyIoU() for who in ("student", "teacher") for k in cfg.eval.student_steps})

    def guidance_vector(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full((like.shape[0],), self.cfg.guidance, device=like.device)

    def edge_points(self, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, s: torch.Tensor,
                    cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y_student, y_target, student velocity): both networks' points at the phase edge ``s``."""
        w = self.guidance_vector(x_t)
        uncond = self.conditioner.unconditional(cond.shape[0], cond.device, cond.dtype)
        with torch.no_grad():
            x_next = euler_step(x_t, guided_velocity(self.teacher, x_t, t, cond, uncond, w), t, t_next)
            target_net = self.target if self.target is not None else self.dit
            y_target = euler_step(x_next, target_net(x_next, t_next, cond, guidance=w), t_next, s)
        v = self.dit(x_t, t, cond, guidance=w)
        return euler_step(x_t, v, t, s), y_target, v

    def consistency_loss(self, x1: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the student's data estimate x1_hat) for clean latents x1 [B, N, C] and condition tokens."""
        t, t_next, s = self.cfg.grid.sample(x1.shape[0], device=x1.device)
        x_t = interpolate(x1, torch.randn_like(x1), t)
        y_student, y_target, v = self.edge_points(x_t, t, t_next, s, cond)
        if self.cfg.loss == "huber":
            loss = pseudo_huber(y_student, y_target, self.cfg.huber_c)
        else:
            loss = F.mse_loss(y_student.float(), y_target.float())
        return loss, euler_step(x_t, v, t, 1.0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x1 = self.clean_latents(batch)
        loss, _ = self.consistency_loss(x1, self.condition(batch))
        b = x1.shape[0]
        self.log("train/loss", loss, batch_size=b)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=b)
        return loss

    def update_target(self) -> None:
        """target <- decay * target + (1 - decay) * student (``ema_update``)."""
        if self.target is not None:
            ema_update(self.target, self.dit, self.cfg.ema_decay)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the student, then the EMA target: both inside the optimizer step, so that a checkpoint written
        after the batch (ModelCheckpoint, the SLURM requeue) holds the target of the same step as the student."""
        super().optimizer_step(*args, **kwargs)
        self.update_target()

    def few_step_sample(self, noise: torch.Tensor, cond: torch.Tensor, steps: int) -> torch.Tensor:
        """The student's ``steps``-step sample on the phased grid of its phases."""
        return euler_sample(self.dit, noise, cond, None, guidance=self.cfg.guidance,
                            grid=phased_grid(steps, self.cfg.grid.phases))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        e = self.cfg.eval
        if e.max_batches is not None and batch_idx >= e.max_batches:
            return
        x1 = self.clean_latents(batch)
        cond = self.condition(batch)
        b = x1.shape[0]
        uncond = self.conditioner.unconditional(b, cond.device, cond.dtype)
        points = batch["vol"][..., :3]

        def field(latents: torch.Tensor) -> torch.Tensor:
            return self.vae.query(self.vae.decode(latents / self.vae.scale_factor), points).float()

        for draw, noise in self.eval_noise(batch, batch_idx, x1):
            reference = field(euler_sample(self.teacher, noise, cond, uncond, steps=e.steps, guidance=e.guidance))
            for k in e.student_steps:
                samples = {"student": self.few_step_sample(noise, cond, k),
                           "teacher": euler_sample(self.teacher, noise, cond, uncond, steps=k, guidance=e.guidance)}
                if batch_idx == 0 and draw == 0 and k == max(e.student_steps):
                    self.save_samples(samples["student"], batch)
                for who, latents in samples.items():
                    self.few_step[f"{who}{k}"].update(field(latents), reference)
        for k in e.student_steps:
            for who in ("student", "teacher"):
                self.log_metric(f"val/{who}_{k}step_iou_vs_teacher{e.steps}", self.few_step[f"{who}{k}"], b)
