"""``adversarial`` stage (paper 3.3, adversarial finetuning): the phase-1 student keeps its consistency loss
and adds a latent GAN term against clean ground-truth latents.

Generator = the student (``init_from`` a phase-1 consistency checkpoint, whose teacher is kept); its fake is
its data estimate x1_hat = x_t + (1 - t) f(x_t, t); real = the clean latents x1, no added noise (FlashVDM,
unlike PCM's re-noised target). Discriminator = ``LatentDiscriminator`` over the frozen teacher DiT with
trainable heads. Hinge loss L_D = mean relu(1 - D(real)) + mean relu(1 + D(fake)) (the paper's equation 3
swaps the two: a sign typo); generator term relu(1 - D(fake)) (``hinge``) or -D(fake) (``linear``);
generator loss = consistency + ``adv_weight`` x adversarial.

Manual optimization with two optimizers that alternate as in PCM: even steps update the heads, odd steps the
generator (then the EMA target), so each batch takes exactly one optimizer step and ``trainer.max_steps``
counts batches. Gradients are clipped per optimizer (``trainer.gradient_clip_val``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fvdm.config import ConfigError
from fvdm.consistency import PhaseGrid
from fvdm.models.discriminator import DiscriminatorConfig, LatentDiscriminator
from fvdm.stages.base import OptimConfig, build_optimizer
from fvdm.stages.consistency import ConsistencyDistillation, ConsistencyStageConfig


@dataclass
class AdversarialStageConfig(ConsistencyStageConfig):
    stage: str = "adversarial"
    grid: PhaseGrid = field(default_factory=lambda: PhaseGrid(num_points=100, phases=1))
    adv_weight: float = 0.1
    generator_loss: str = "hinge"  # hinge: relu(1 - D(fake)) | linear: -D(fake)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-7, eps=1e-6, weight_decay=0.01))
    d_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, eps=1e-6, weight_decay=0.01))


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - fake).mean()
    if kind == "linear":
        return -fake.mean()
    raise ConfigError(f"generator_loss: unknown '{kind}' (hinge or linear)")


class AdversarialFinetune(ConsistencyDistillation):
    Config = AdversarialStageConfig

    def __init__(self, cfg: AdversarialStageConfig):
        super().__init__(cfg)
        generator_loss(torch.zeros(1), cfg.generator_loss)  # validate the choice before training
        self.discriminator = LatentDiscriminator(self.teacher, cfg.discriminator)
        self.automatic_optimization = False

    def configure_optimizers(self) -> list[dict[str, Any]]:
        generator = [p for p in self.dit.parameters() if p.requires_grad]
        heads = list(self.discriminator.heads.parameters())
        steps = self.cfg.trainer.max_steps
        return [build_optimizer(generator, self.cfg.optim, steps), build_optimizer(heads, self.cfg.d_optim, steps)]

    def _step(self, index: int, loss: torch.Tensor) -> None:
        """Backward, clip, step and schedule optimizer ``index`` (0: generator, 1: discriminator heads)."""
        opt, sched = self.optimizers()[index], self.lr_schedulers()[index]
        opt.zero_grad()
        self.manual_backward(loss)
        if self.cfg.trainer.gradient_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.cfg.trainer.gradient_clip_val,
                                gradient_clip_algorithm="norm")
        opt.step()
        sched.step()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Even steps step the heads, odd steps the generator; every step logs all losses (a metric logged on
        alternate steps only would be repeated stale by Lightning at the others)."""
        x1 = self.clean_latents(batch)
        cond = self.condition(batch)
        w = self.cfg.guidance
        train_heads = self.global_step % 2 == 0
        with torch.set_grad_enabled(not train_heads):
            loss_cf, fake = self.consistency_loss(x1, cond)
            d_fake_for_g = self.discriminator(fake, cond, w)
        with torch.set_grad_enabled(train_heads):
            d_real = self.discriminator(x1, cond, w)
            d_fake = self.discriminator(fake.detach(), cond, w) if train_heads else d_fake_for_g.detach()
            loss_d = discriminator_loss(d_real, d_fake)
        loss_adv = generator_loss(d_fake_for_g, self.cfg.generator_loss)
        loss = loss_cf + self.cfg.adv_weight * loss_adv
        if train_heads:
            self._step(1, loss_d)
        else:
            self._step(0, loss)
            self.update_target()
        b = x1.shape[0]
        self.log_dict({"train/loss": loss, "train/loss_cf": loss_cf, "train/loss_adv": loss_adv,
                       "train/loss_d": loss_d}, batch_size=b)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=b)
