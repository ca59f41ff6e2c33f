"""``flow`` stage: train the teacher DiT by flow matching on latents of the frozen VAE, with condition dropout
for classifier-free guidance (convention: ``fvdm.flow``).

The DiT's ``in_channels`` and ``context_in_dim`` follow the VAE and the conditioner, whatever the ``dit``
section says. Evaluation samples ``eval.steps``-step CFG meshes from held-out renders and reports their
occupancy IoU against the rendered shape beside three references on the same points: conditional samples
without guidance (w = 1: whether the conditioning was learned, apart from CFG's overshoot on a weak teacher),
unconditional samples (all-zero condition tokens: the baseline a conditional model must beat) and the VAE's
own reconstruction (the ceiling).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from fvdm.config import ConfigError, RunConfig
from fvdm.flow import TimestepSampling, interpolate, sample_timesteps, velocity_target
from fvdm.metrics.reconstruction import OccupancyIoU
from fvdm.models.conditioner import ConditionerConfig, build_conditioner
from fvdm.models.dit import DiTConfig, FlowDiT, dit_preset
from fvdm.sampler import euler_sample
from fvdm.stages.base import OptimConfig
from fvdm.stages.checkpoints import load_diffusion, load_pretrained_vae
from fvdm.stages.diffusion import GenerationEvalConfig, LatentDiffusionStage, occupancy_iou


@dataclass
class FlowStageConfig(RunConfig):
    PRESETS: ClassVar[dict] = {"dit_preset": ("dit", dit_preset)}

    stage: str = "flow"
    vae_from: Optional[str] = None  # vae / decoder_ft checkpoint or Hunyuan3D-2 VAE folder (with an encoder): frozen
    init_from: Optional[str] = None  # continue from a flow checkpoint or a released DiT bundle (then vae_from,
    #                                  dit and conditioner are taken from it and may be left unset)
    latent_scale: str = "auto"  # auto: 1 / std of the first batch's latents | vae: the VAE's stored value | a number
    latents: Optional[str] = None  # latent shards from fvdm cache-latents (their scale factor wins) instead of
    #                                encoding data.train at every step; validation still reads data.val
    dit_preset: Optional[str] = "tiny"  # tiny | mini | large: fills the dit section's defaults
    dit: DiTConfig = field(default_factory=DiTConfig)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    timesteps: TimestepSampling = field(default_factory=TimestepSampling)
    # Hunyuan3D-2.1's DiT training: AdamW (0.9, 0.99), eps 1e-6, weight decay 0.01, short warm-up, constant lr
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, eps=1e-6, weight_decay=0.01,
                                                                   warmup_steps=50))
    eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)


class FlowStage(LatentDiffusionStage):
    """Teacher training: velocity MSE at t drawn per sample, condition tokens zeroed with ``drop_prob``."""

    Config = FlowStageConfig

    def __init__(self, cfg: FlowStageConfig):
        super().__init__(cfg)
        cfg.timesteps.validate()
        if cfg.init_from:
            dit, vae, conditioner = load_diffusion(cfg.init_from)
            if dit.cfg.guidance_embed:
                raise ConfigError(f"init_from: {cfg.init_from} is guidance-distilled; the flow stage trains "
                                  "a CFG teacher (guidance_embed false)")
        else:
            if not cfg.vae_from:
                raise ConfigError("vae_from: the flow stage needs a VAE (vae checkpoint or Hunyuan3D-2 folder)")
            vae = load_pretrained_vae(cfg.vae_from)
            conditioner = build_conditioner(cfg.conditioner)
            dit = FlowDiT(dataclasses.replace(cfg.dit, in_channels=vae.cfg.embed_dim,
                                              context_in_dim=conditioner.out_dim))
        if not vae.has_encoder:
            raise ConfigError("vae_from: a decoder-only VAE cannot make training latents; use one with an encoder")
        self.set_models(dit, vae, conditioner, train_conditioner=conditioner.trainable)
        self.prepare_dits()
        cached_scale = self.check_latent_cache(scale_fixed=bool(cfg.init_from))
        self.register_buffer("scale_ready", torch.tensor(cfg.latent_scale != "auto" or bool(cfg.init_from)
                                                         or cached_scale is not None))
        if cached_scale is not None:
            self.vae.scale_factor = cached_scale
        elif cfg.latent_scale not in ("auto", "vae"):
            try:
                self.vae.scale_factor = float(cfg.latent_scale)
            except ValueError:
                raise ConfigError(f"latent_scale: '{cfg.latent_scale}' is not auto, vae or a number") from None
        self.gen_iou, self.cond_iou, self.uncond_iou, self.recon_iou = (OccupancyIoU() for _ in range(4))

    @torch.no_grad()
    def estimate_latent_scale(self, batch: dict[str, Any]) -> None:
        """Set the VAE's scale factor to 1 / std of this batch's latents (averaged over ranks), once per run,
        so the DiT sees unit-variance data; it is saved with the VAE and exported with it."""
        self.vae.scale_factor = 1.0
        std = self.clean_latents(batch).float().std()
        std = self.trainer.strategy.reduce(std, reduce_op="mean") if self._trainer is not None else std
        self.vae.scale_factor = 1.0 / float(std)
        self.scale_ready.fill_(True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if not bool(self.scale_ready):
            self.estimate_latent_scale(batch)
        x1 = self.clean_latents(batch)
        cond = self.conditioner.drop(self.condition(batch))
        t = sample_timesteps(x1.shape[0], self.cfg.timesteps, device=x1.device)
        eps = torch.randn_like(x1)
        v = self.dit(interpolate(x1, eps, t), t, cond)
        loss = F.mse_loss(v.float(), velocity_target(x1, eps).float())
        bs = x1.shape[0]
        self.log("train/loss", loss, batch_size=bs)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=bs)
        self.log("train/latent_scale", self.vae.scale_factor, batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        e = self.cfg.eval
        if e.max_batches is not None and batch_idx >= e.max_batches:
            return
        x1 = self.clean_latents(batch)
        cond = self.condition(batch)
        uncond = self.conditioner.unconditional(cond.shape[0], cond.device, cond.dtype)
        points, sdf = batch["vol"][..., :3], batch["vol"][..., 3]
        for draw, noise in self.eval_noise(batch, batch_idx, x1):
            guided = euler_sample(self.dit, noise, cond, uncond, steps=e.steps, guidance=e.guidance)
            conditional = euler_sample(self.dit, noise, cond, None, steps=e.steps)
            unconditional = euler_sample(self.dit, noise, uncond, None, steps=e.steps)
            if batch_idx == 0 and draw == 0:
                self.save_samples(guided, batch)
            occupancy_iou(self.vae, guided, points, sdf, self.gen_iou)
            occupancy_iou(self.vae, conditional, points, sdf, self.cond_iou)
            occupancy_iou(self.vae, unconditional, points, sdf, self.uncond_iou)
        occupancy_iou(self.vae, x1, points, sdf, self.recon_iou)
        bs = x1.shape[0]
        self.log_metric("val/gen_v_iou", self.gen_iou, bs)
        self.log_metric("val/gen_v_iou_w1", self.cond_iou, bs)
        self.log_metric("val/gen_v_iou_uncond", self.uncond_iou, bs)
        self.log_metric("val/recon_v_iou", self.recon_iou, bs)
