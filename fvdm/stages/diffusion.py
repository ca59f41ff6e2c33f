"""What the diffusion stages share: a frozen VAE that makes latents and decodes samples, the image
conditioner, the DiT, and sampling-based evaluation against ground-truth occupancy.

Checkpoints hold all three modules (keys ``vae.``, ``conditioner.``, ``dit.``) with their configs, like a
released Hunyuan3D-2 bundle, so one file is enough to sample, evaluate, export or start the next stage.
"""
from __future__ import annotations

import dataclasses
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from lightning.pytorch.loggers import MLFlowLogger
from torchmetrics import MeanMetric

from fvdm.callbacks.reconstruction import EvalSettings, write_mesh_files
from fvdm.config import ConfigError
from fvdm.data.datamodule import ShapeDataModule
from fvdm.data.latents import read_index, vae_fingerprint
from fvdm.decoding.mesh import decode_mesh
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
    seed: int = 0  # a shape's noise is drawn from (seed, its key), so evaluations compare like with like
    noise_draws: int = 1  # samples per held-out shape from independent noise: more draws, a steadier mean IoU
    saved_meshes: int = 4  # samples of validation batch 0 saved as PLY + preview to MLflow (rank zero)
    mesh_resolution: int = 64  # marching-cubes cells per axis of those meshes

    def __post_init__(self) -> None:
        if self.noise_draws < 1:
            raise ConfigError(f"eval.noise_draws: need at least 1, got {self.noise_draws}")


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

    def set_models(self, dit: FlowDiT, vae: VecSetVAE, conditioner: ImageConditioner,
                   train_conditioner: bool = False) -> None:
        """Register the trained DiT (and the image encoder when ``train_conditioner``); hold the frozen VAE and
        a frozen image encoder beside the module (``Stage.hold``)."""
        self.dit = dit
        self.hold("vae", freeze(vae))
        if train_conditioner:
            self.conditioner = conditioner
        else:
            self.hold("conditioner", freeze(conditioner))

    def prepare_dits(self) -> None:
        """Apply ``trainer.activation_checkpointing`` (to the trained DiT) and ``trainer.compile`` (to every DiT
        the stage runs); called once the stage holds all of them."""
        self.dit.checkpoint_blocks = self.cfg.trainer.activation_checkpointing
        if self.cfg.trainer.compile:
            for dit in [self.dit] + [m for m in self.held.values() if isinstance(m, FlowDiT)]:
                dit.compile_blocks()

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the registered trainable parameters: the DiT, and the image encoder when it is not frozen
        (the ``small`` one in the ``flow`` stage); held modules never enter the optimizer."""
        return build_optimizer([p for p in self.parameters() if p.requires_grad], self.cfg.optim,
                               self.cfg.trainer.max_steps)

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

    def eval_noise(self, batch: dict[str, Any], batch_idx: int,
                   like: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """``(draw, noise)`` for each of the ``eval.noise_draws`` fixed noise draws of a validation batch, shaped
        like ``like`` [B, N, C] (``eval_values``)."""
        for draw in range(self.cfg.eval.noise_draws):
            yield draw, self.eval_values(batch, batch_idx, draw, like.shape).to(like)

    def eval_values(self, batch: dict[str, Any], batch_idx: int, draw: int, shape: Sequence[int],
                    sampler: Callable[..., torch.Tensor] = torch.randn, stream: str = "") -> torch.Tensor:
        """[B, ...] = ``shape`` values of ``sampler`` (``torch.randn``, ``torch.rand``) for a validation batch, one
        generator per sample seeded by ``eval.seed``, the sample's shape ``key``, the draw and ``stream``: a shape
        gets the same values at every evaluation, in every stage, whatever batch, worker or rank it lands in.
        Batches without keys use the batch index and row instead."""
        keys = batch.get("key") or [f"batch{batch_idx}/{row}" for row in range(shape[0])]
        tag = f"/{stream}" if stream else ""
        return torch.stack([sampler(tuple(shape[1:]), generator=torch.Generator().manual_seed(
            zlib.crc32(f"{self.cfg.eval.seed}/{key}/{draw}{tag}".encode()))) for key in keys])

    def save_samples(self, latents: torch.Tensor, batch: dict[str, Any]) -> None:
        """The first ``eval.saved_meshes`` of DiT-space ``latents`` [B, N, C] (samples for validation batch 0) as
        PLY meshes and a preview beside the ground-truth surface points, logged to MLflow under
        ``samples/step_NNNNNNN`` (rank zero; nothing without an MLflow logger)."""
        e = self.cfg.eval
        count = min(e.saved_meshes, latents.shape[0])
        loggers = [logger for logger in self.loggers if isinstance(logger, MLFlowLogger)]
        if count == 0 or not loggers or not self.trainer.is_global_zero:
            return
        meshes = decode_mesh(self.vae, latents[:count] / self.vae.scale_factor, e.mesh_resolution)
        keys = batch.get("key") or [f"sample{i}" for i in range(count)]
        kept = [(str(keys[i]), mesh, batch["surface"][i, :, :3].float().cpu().numpy())
                for i, mesh in enumerate(meshes)]
        with tempfile.TemporaryDirectory() as tmp:
            settings = EvalSettings(num_saved_meshes=count, preview_shapes=count, seed=e.seed)
            for path in write_mesh_files(Path(tmp), kept, settings):
                for logger in loggers:
                    logger.experiment.log_artifact(logger.run_id, str(path), f"samples/step_{self.global_step:07d}")

    def log_metric(self, name: str, metric: Any, batch_size: int) -> None:
        self.log(name, metric, on_step=False, on_epoch=True, batch_size=batch_size)


def mean_metrics(names: list[str]) -> torch.nn.ModuleDict:
    """Fresh ``MeanMetric`` objects by metric name, "/" written "__" in the keys."""
    return torch.nn.ModuleDict({n.replace("/", "__"): MeanMetric() for n in names})
