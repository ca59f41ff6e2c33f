"""What the diffusion stages share: a frozen VAE that makes latents and decodes samples, the image
conditioner, the DiT, and sampling-based evaluation against ground-truth occupancy.

Checkpoints hold all three modules (keys ``vae.``, ``conditioner.``, ``dit.``) with their configs, like a
released Hunyuan3D-2 bundle, so one file is enough to sample, evaluate, export or start the next stage.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torchmetrics import MeanMetric

from fvdm.config import ConfigError
from fvdm.data.datamodule import ShapeDataModule
from fvdm.data.latents import read_index, vae_fingerprint
from fvdm.metrics.reconstruction import OccupancyIoU
from fvdm.models.conditioner import ImageConditioner
from fvdm.models.dit import FlowDiT
from fvdm.models.vae import VecSetVAE
from fvdm.stages.base import Stage, build_optimizer, freeze
from fvdm.stages.vae import VAE_CONFIG_KEY

DIT_CONFIG_KEY = "fvdm_dit_config"
CONDITIONER_CONFIG_KEY = "fvdm_conditioner_config"
TEACHER_CONFIG_KEY = "fvdm_teacher_config"  # the frozen teacher of guidance / consistency checkpoints


@dataclass
class GenerationEvalConfig:
    """Sampling evaluation on the validation stream: ``steps``-step Euler samples at guidance ``guidance``."""

    steps: int = 50
    guidance: float = 5.0
    max_batches: Optional[int] = 4  # validation batches evaluated per rank (None: all)
    seed: int = 0  # noise of batch i is drawn from seed + i, so evaluations compare like with like


def occupancy_iou(vae: VecSetVAE, latents: torch.Tensor, points: torch.Tensor, reference_sdf: torch.Tensor,
                  metric: OccupancyIoU) -> None:
    """Decode DiT-space ``latents`` [B, N, C] and update ``metric`` with the field's occupancy IoU against
    ``reference_sdf`` [B, P] at ``points`` [B, P, 3]."""
    tokens = vae.decode(latents / vae.scale_factor)
    metric.update(vae.query(tokens, points).float(), reference_sdf.float())


class LatentDiffusionStage(Stage):
    """Base of the ``flow``, ``guidance``, ``consistency`` and ``adversarial`` stages: subclasses set ``vae``,
    ``conditioner`` and ``dit``."""

    vae: VecSetVAE
    conditioner: ImageConditioner
    dit: FlowDiT

    def datamodule(self) -> ShapeDataModule:
        return ShapeDataModule(self.cfg.data, images=True, latents=self.cfg.latents)

    def check_latent_cache(self, scale_fixed: bool = True) -> Optional[float]:
        """With ``latents`` set: check the cache was made by this VAE (and, when the models were trained on a
        scale already, ``scale_fixed``, with that scale) and return its scale factor."""
        if not self.cfg.latents:
            return None
        index = read_index(self.cfg.latents)
        if index["vae_fingerprint"] != vae_fingerprint(self.vae):
            raise ConfigError(f"latents: {self.cfg.latents} was encoded by another VAE ({index['vae']}); "
                              "rerun fvdm cache-latents with this stage's VAE")
        scale = float(index["scale_factor"])
        if scale_fixed and scale != self.vae.scale_factor:
            raise ConfigError(f"latents: {self.cfg.latents} has scale factor {scale}, the models were trained "
                              f"with {self.vae.scale_factor}; cache them with --scale vae")
        return scale

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules held in eval mode without gradients (the VAE, a frozen conditioner, a teacher)."""
        return [self.vae] + ([] if self.conditioner.trainable else [self.conditioner])

    def freeze_frozen(self) -> None:
        for module in self.frozen_modules():
            freeze(module)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over what trains: the DiT, and the image encoder when it is not frozen (the ``small`` one in
        the ``flow`` stage); frozen modules never enter the optimizer."""
        params = [p for m in (self.dit, self.conditioner) for p in m.parameters() if p.requires_grad]
        return build_optimizer(params, self.cfg.optim, self.cfg.trainer.max_steps)

    def train(self, mode: bool = True) -> "LatentDiffusionStage":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # frozen modules stay in eval mode whatever Lightning asks
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[VAE_CONFIG_KEY] = dataclasses.asdict(self.vae.cfg)
        checkpoint[DIT_CONFIG_KEY] = dataclasses.asdict(self.dit.cfg)
        checkpoint[CONDITIONER_CONFIG_KEY] = dataclasses.asdict(self.conditioner.cfg)
        if isinstance(getattr(self, "teacher", None), FlowDiT):
            checkpoint[TEACHER_CONFIG_KEY] = dataclasses.asdict(self.teacher.cfg)

    @torch.no_grad()
    def clean_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """DiT-space data latents x1 = scale_factor * VAE latents [B, N, C] (posterior samples, frozen VAE);
        batches from latent shards carry them ready."""
        if "latents" in batch:
            return batch["latents"]
        return self.vae.encode(batch["surface"]) * self.vae.scale_factor

    def condition(self, batch: dict[str, Any]) -> torch.Tensor:
        """Condition tokens [B, L, D] of the batch's images (no gradient when the conditioner is frozen)."""
        if "image" not in batch:
            raise ValueError("diffusion stages need condition images: these shards carry no renders "
                             "(make them with fvdm synth/prepare and renders > 0)")
        trains = self.training and any(p.requires_grad for p in self.conditioner.parameters())
        with torch.set_grad_enabled(trains):
            return self.conditioner(batch["image"])

    def eval_noise(self, batch_idx: int, like: torch.Tensor) -> torch.Tensor:
        """Fixed noise for validation batch ``batch_idx`` (same at every evaluation and in every stage)."""
        g = torch.Generator().manual_seed(self.cfg.eval.seed + batch_idx)
        return torch.randn(like.shape, generator=g).to(like)

    def log_metric(self, name: str, metric: Any, batch_size: int) -> None:
        self.log(name, metric, on_step=False, on_epoch=True, batch_size=batch_size)


def mean_metrics(names: list[str]) -> torch.nn.ModuleDict:
    """Fresh ``MeanMetric`` objects by metric name, "/" written "__" in the keys."""
    return torch.nn.ModuleDict({n.replace("/", "__"): MeanMetric() for n in names})
