"""``decoder_ft`` stage (paper appendix A): swap in the efficient geo decoder and finetune the decoder side.

The encoder (and its posterior projection) come frozen from a ``vae`` checkpoint or an imported
Hunyuan3D-2 VAE with an encoder; the self-attention trunk starts from the checkpoint; the new, narrower
geo decoder starts from scratch. Trunk and new geo decoder train together on the same tSDF loss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import torch
from omegaconf import MISSING

from fvdm.config import ConfigError, RunConfig
from fvdm.models.vae import VecSetVAE
from fvdm.stages.base import OptimConfig, freeze
from fvdm.stages.checkpoints import load_pretrained_vae
from fvdm.stages.vae import EvalConfig, TSDFLossConfig, VAEStage, compile_vae


@dataclass
class GeoDecoderConfig:
    """The new geo decoder; defaults are FlashVDM's efficient (Hunyuan "turbo") design."""

    downsample_ratio: int = 2
    mlp_ratio: int = 1
    ln_post: bool = False
    qk_norm: bool = False


@dataclass
class DecoderFinetuneConfig(RunConfig):
    stage: str = "decoder_ft"
    init_from: str = MISSING  # vae-stage checkpoint (.ckpt) or Hunyuan3D-2 VAE folder with an encoder
    geo: GeoDecoderConfig = field(default_factory=GeoDecoderConfig)
    loss: TSDFLossConfig = field(default_factory=TSDFLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, schedule="constant"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    compile: bool = False  # as in the vae stage: torch.compile the encoder, trunk blocks and new geo decoder


class DecoderFinetune(VAEStage):
    Config = DecoderFinetuneConfig

    def __init__(self, cfg: DecoderFinetuneConfig):
        super(VAEStage, self).__init__(cfg)
        teacher = load_pretrained_vae(cfg.init_from)
        if not teacher.has_encoder:
            raise ConfigError(f"init_from: {cfg.init_from} is a decoder-only VAE; decoder finetuning needs the "
                              "encoder to make latents from data (use a with-encoder release or a vae checkpoint)")
        g = cfg.geo
        vae_cfg = dataclasses.replace(teacher.cfg, geo_downsample_ratio=g.downsample_ratio, geo_mlp_ratio=g.mlp_ratio,
                                      geo_ln_post=g.ln_post, geo_qk_norm=g.qk_norm)
        self.vae = VecSetVAE(vae_cfg)
        kept = {k: v for k, v in teacher.state_dict().items() if not k.startswith("geo_decoder.")}
        missing, unexpected = self.vae.load_state_dict(kept, strict=False)
        assert not unexpected and all(k.startswith("geo_decoder.") for k in missing), (missing, unexpected)
        freeze(self.vae.encoder)
        freeze(self.vae.pre_kl)
        if cfg.compile:
            compile_vae(self.vae)

    def train(self, mode: bool = True) -> "DecoderFinetune":
        super().train(mode)
        self.vae.encoder.eval()  # frozen modules stay in eval mode whatever Lightning asks
        self.vae.pre_kl.eval()
        return self

    def encode(self, surface: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents from the frozen encoder; no KL term (nothing upstream of it trains)."""
        with torch.no_grad():
            latents = self.vae.encode_posterior(surface).sample()
        return latents, torch.zeros((), device=latents.device)
