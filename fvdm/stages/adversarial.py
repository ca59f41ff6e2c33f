"""``adversarial`` stage (paper 3.3, adversarial finetuning): the phase-1 student keeps its consistency loss
and adds a latent GAN term against clean ground-truth latents.

Generator = the student (``init_from`` a phase-1 consistency checkpoint, whose teacher is kept); its fake is
its data estimate x1_hat = x_t + (1 - t) f(x_t, t); real = the clean latents x1, no added noise (FlashVDM,
unlike PCM's re-noised target). Discriminator = ``LatentDiscriminator`` over the frozen teacher DiT with
trainable heads. Hinge loss L_D = mean relu(1 - D(real)) + mean relu(1 + D(fake)) (the paper's equation 3
swaps the two: a sign typo); generator term relu(1 - D(fake)) (``hinge``) or -D(fake) (``linear``);
generator loss = consistency + ``adv_weight`` x adversarial.

Both networks step on every batch with their own AdamW (the PCM paper alternates D and G steps; the FlashVDM
recipe allows either): first the heads on (real, detached fake), then the generator on the same batch with the
updated heads. The generator is the stage's one Lightning optimizer, so the stage runs unchanged under DDP and
DeepSpeed (which takes one optimizer); the heads are held beside the module (``Stage.hold``) with their own
optimizer and a mean all-reduce of their gradients across ranks, and both are saved in checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fvdm.config import ConfigError
from fvdm.consistency import PhaseGrid
from fvdm.models.discriminator import DiscriminatorConfig, LatentDiscriminator
from fvdm.stages.base import OptimConfig, build_optimizer
from fvdm.stages.consistency import ConsistencyDistillation, ConsistencyStageConfig

D_OPTIMIZER_KEY = "fvdm_discriminator_optimizer"  # the heads' AdamW and schedule, for --resume


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


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of ``params``' gradients over all ranks (one flat all-reduce), for modules outside DDP/DeepSpeed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


class AdversarialFinetune(ConsistencyDistillation):
    Config = AdversarialStageConfig

    def __init__(self, cfg: AdversarialStageConfig):
        super().__init__(cfg)
        generator_loss(torch.zeros(1), cfg.generator_loss)  # validate the choice before training
        self.hold("discriminator", LatentDiscriminator(self.teacher, cfg.discriminator))
        d = build_optimizer(list(self.discriminator.parameters()), cfg.d_optim, cfg.trainer.max_steps)
        self.d_optimizer, self.d_scheduler = d["optimizer"], d["lr_scheduler"]["scheduler"]
        self.restored_d_state: dict[str, Any] | None = None

    def discriminator_step(self, real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
        """One AdamW step of the heads on the hinge loss of the backbone features of clean latents ``real`` against
        those of the generator's sample ``fake`` (both without a graph into the backbone)."""
        self.d_optimizer.zero_grad(set_to_none=True)
        loss_d = discriminator_loss(self.discriminator.score(real), self.discriminator.score(fake))
        loss_d.backward()
        params = list(self.discriminator.parameters())
        average_gradients(params)
        if self.cfg.trainer.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.trainer.gradient_clip_val)
        self.d_optimizer.step()
        self.d_scheduler.step()
        return loss_d.detach()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Heads step, then the generator loss (consistency + adv_weight x adversarial) is returned for the
        stage's optimizer; the heads take no gradient from it. The frozen backbone runs twice a step: on the
        clean latents (no graph) and once on the generator's sample, whose features serve the heads' step
        (detached) and then, through the updated heads, the generator's term."""
        x1 = self.clean_latents(batch)
        cond = self.condition(batch)
        loss_cf, fake = self.consistency_loss(x1, cond)
        w = self.cfg.guidance
        with torch.no_grad():
            real_features = self.discriminator.features(x1, cond, w)
        fake_features = self.discriminator.features(fake, cond, w)
        loss_d = self.discriminator_step(real_features, [f.detach() for f in fake_features])
        self.discriminator.requires_grad_(False)
        loss_adv = generator_loss(self.discriminator.score(fake_features), self.cfg.generator_loss)
        self.discriminator.requires_grad_(True)
        loss = loss_cf + self.cfg.adv_weight * loss_adv
        b = x1.shape[0]
        self.log_dict({"train/loss": loss, "train/loss_cf": loss_cf, "train/loss_adv": loss_adv,
                       "train/loss_d": loss_d}, batch_size=b)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=b)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[D_OPTIMIZER_KEY] = {"optimizer": self.d_optimizer.state_dict(),
                                       "scheduler": self.d_scheduler.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.restored_d_state = checkpoint.get(D_OPTIMIZER_KEY)

    def on_train_start(self) -> None:
        """Restore the heads' optimizer once the heads sit on their device (its state follows the params)."""
        super().on_train_start()
        if self.restored_d_state is not None:
            self.d_optimizer.load_state_dict(self.restored_d_state["optimizer"])
            self.d_scheduler.load_state_dict(self.restored_d_state["scheduler"])
            self.restored_d_state = None
