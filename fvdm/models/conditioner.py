"""Image conditioning for the flow-matching DiT: condition images -> tokens [B, L, D] for the DiT's ``cond_in``.

Input images: float [B, 3, H, W] in [0, 1] with the object on a white background (fvdm's ``batch["image"]``),
or [B, 4, H, W] RGBA whose alpha marks the object. Every encoder first recentres the object (``recenter``), the
released Hunyuan3D-2 preprocessing.

- ``dinov2``: the released encoder, a frozen DINOv2 (Hugging Face ``Dinov2Model``; ViT-giant/14 by default),
  weights from local files only. State-dict keys ``main_image_encoder.model.*`` as in the released bundles.
- ``small``: a small trainable ViT for the embedded default (128-px renders on a few CPU cores).

The unconditional input for classifier-free guidance is all-zero tokens in encoder-output space.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fvdm.models.attention import SelfAttentionBlock

RECENTER_SIZE = 512  # the released pipeline recentres to 512 px before DINOv2's own resize
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Hugging Face Dinov2Config values of DINOv2 ViT-giant/14, the released Hunyuan3D-2 image encoder
DINOV2_GIANT = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, patch_size=14,
                    image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=True, qkv_bias=True,
                    hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    drop_path_rate=0.0, num_channels=3)


def recenter(images: torch.Tensor, border_ratio: float = 0.15, size: int = 512,
             white_threshold: float = 0.98) -> torch.Tensor:
    """Crop the object and centre it on a white square canvas it fills to ``1 - border_ratio``: [B, 3, size, size].

    Object pixels: alpha > 0.5 for RGBA input (composited on white first), else pixels whose darkest channel is
    below ``white_threshold``. The bbox is pasted centred on a white canvas of side max(bbox h, w) / (1 -
    border_ratio), then resized bicubic (antialiased) and clamped to [0, 1]. An image without object pixels is
    padded square and resized. Output float32.
    """
    if images.ndim != 4 or images.shape[1] not in (3, 4):
        raise ValueError(f"recenter: expected [B, 3 or 4, H, W] images, got {tuple(images.shape)}")
    if not 0 <= border_ratio < 1:
        raise ValueError(f"recenter: border_ratio must be in [0, 1), got {border_ratio}")
    images = images.float()
    _, c, h, w = images.shape
    if c == 4:
        alpha = images[:, 3:]
        rgb = images[:, :3] * alpha + (1 - alpha)
        mask = alpha[:, 0] > 0.5  # [B, H, W]
    else:
        rgb = images
        mask = images.amin(dim=1) < white_threshold
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # [B, H], [B, W]
    found = rows.any(dim=1).tolist()
    y0 = rows.int().argmax(dim=1).tolist()
    y1 = (h - rows.flip(1).int().argmax(dim=1)).tolist()  # exclusive end
    x0 = cols.int().argmax(dim=1).tolist()
    x1 = (w - cols.flip(1).int().argmax(dim=1)).tolist()
    out = []
    for i, img in enumerate(rgb):
        top_, bottom, left_, right = (y0[i], y1[i], x0[i], x1[i]) if found[i] else (0, h, 0, w)
        bh, bw = bottom - top_, right - left_
        side = round(max(bh, bw) / (1 - border_ratio)) if found[i] else max(h, w)
        canvas = rgb.new_ones(3, side, side)
        top, left = (side - bh) // 2, (side - bw) // 2
        canvas[:, top:top + bh, left:left + bw] = img[:, top_:bottom, left_:right]
        out.append(F.interpolate(canvas[None], size=(size, size), mode="bicubic", align_corners=False,
                                 antialias=True))
    return torch.cat(out).clamp_(0, 1)


def _check_border(owner: str, border_ratio: float) -> None:
    if not 0 <= border_ratio < 1:
        raise ValueError(f"{owner}.border_ratio: must be in [0, 1), got {border_ratio}")


@dataclass
class DinoConfig:
    """The frozen DINOv2 encoder: Hugging Face ``Dinov2Config`` values, input size and local weights."""

    config: dict = field(default_factory=lambda: dict(DINOV2_GIANT))  # Dinov2Config keyword values
    image_size: int = 518  # input side fed to the model (a multiple of the patch size)
    use_cls_token: bool = True  # keep the CLS token in front of the patch tokens (the released setting)
    # local Dinov2Model state dict (.safetensors / .bin / .pt) or a save_pretrained directory; None: random init
    weights: Optional[str] = None
    border_ratio: float = 0.15  # recentring margin

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the values cannot build the encoder."""
        from transformers import Dinov2Config  # heavy import: only the dinov2 path pays it

        unknown = sorted(set(self.config) - set(Dinov2Config().to_dict()))
        if unknown:
            raise ValueError(f"DinoConfig.config: unknown Dinov2Config keys {unknown}")
        hf = Dinov2Config(**self.config)
        if hf.hidden_size % hf.num_attention_heads:
            raise ValueError(f"DinoConfig.config: hidden_size {hf.hidden_size} is not divisible by "
                             f"{hf.num_attention_heads} heads")
        if self.image_size < 1 or self.image_size % hf.patch_size:
            raise ValueError(f"DinoConfig.image_size: must be a positive multiple of the patch size "
                             f"{hf.patch_size}, got {self.image_size}")
        _check_border("DinoConfig", self.border_ratio)


_LEGACY_RENAMES = (("attention.attention.query.", "attention.q_proj."),
                   ("attention.attention.key.", "attention.k_proj."),
                   ("attention.attention.value.", "attention.v_proj."),
                   ("attention.output.dense.", "attention.o_proj."),
                   ("mlp.weights_out.", "mlp.down_proj."))


def dinov2_from_legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``Dinov2Model`` state dict in the transformers 4.x layout -> the transformers 5 layout.

    The 4.x layout is the released Hunyuan3D-2 bundles' and what ``save_pretrained`` still writes: split
    ``attention.attention.{query,key,value}`` / ``attention.output.dense`` and a fused SwiGLU input
    ``mlp.weights_in`` ([gate | up] rows). Keys already in the new layout pass unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        if ".mlp.weights_in." in key:
            gate, up = value.chunk(2, dim=0)
            out[key.replace(".weights_in.", ".gate_proj.")] = gate
            out[key.replace(".weights_in.", ".up_proj.")] = up
            continue
        for old, new in _LEGACY_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def dinov2_to_legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`dinov2_from_legacy`: the layout the released bundles (and their loaders) use."""
    out = {}
    for key, value in state_dict.items():
        if ".mlp.up_proj." in key:
            continue  # written with its gate_proj partner
        if ".mlp.gate_proj." in key:
            out[key.replace(".gate_proj.", ".weights_in.")] = torch.cat(
                [value, state_dict[key.replace(".gate_proj.", ".up_proj.")]], dim=0)
            continue
        for old, new in _LEGACY_RENAMES:
            key = key.replace(new, old)
        out[key] = value
    return out


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if path.suffix in (".bin", ".pt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"DinoConfig.weights: {path} is not a .safetensors, .bin or .pt file")


def read_dinov2_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a local weights file or ``save_pretrained`` directory (sharded or not); never a download."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DinoConfig.weights: {path} does not exist")
    if not path.is_dir():
        return _read_weight_file(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _read_weight_file(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in _read_weight_file(path / shard).items()}
    raise FileNotFoundError(f"DinoConfig.weights: no model.safetensors or pytorch_model.bin (or index) in {path}")


class DinoImageEncoder(nn.Module):
    """Frozen DINOv2: recentre to 512 -> bilinear to ``image_size`` -> ImageNet normalisation -> last hidden
    state [B, 1 + (image_size / patch)^2, hidden] (CLS first; dropped when ``use_cls_token`` is False).

    Always in eval mode with ``requires_grad`` off: ``train()`` leaves it in eval.
    """

    trainable = False

    def __init__(self, cfg: DinoConfig):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model  # heavy import: only the dinov2 path pays it

        cfg.validate()
        self.cfg = cfg
        hf = Dinov2Config(**cfg.config)
        if cfg.weights is None:
            self.model = Dinov2Model(hf)
        else:
            with torch.device("meta"):  # no random init of ~1B parameters about to be overwritten
                self.model = Dinov2Model(hf)
            self._load(Path(cfg.weights))
        self.model.requires_grad_(False)
        self.out_dim = hf.hidden_size
        self.num_tokens = (cfg.image_size // hf.patch_size) ** 2 + int(cfg.use_cls_token)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def _load(self, path: Path) -> None:
        """Assign the weights at ``path`` (current or transformers 4.x layout) to the meta-built model."""
        state = read_dinov2_weights(path)
        expected = self.model.state_dict()
        if not set(state) <= set(expected):
            state = dinov2_from_legacy(state)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"DinoConfig.weights: {path} does not match the Dinov2Model config: "
                             f"missing keys {missing}, unexpected keys {unexpected}")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"DinoConfig.weights: {path}: {key} has shape {tuple(value.shape)}, the model "
                                 f"expects {tuple(expected[key].shape)}")
        self.model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)

    def train(self, mode: bool = True) -> DinoImageEncoder:
        """Frozen: stays in eval mode whatever ``mode`` is."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3|4, H, W] in [0, 1] -> normalised pixel values [B, 3, image_size, image_size]."""
        x = recenter(images, self.cfg.border_ratio, RECENTER_SIZE)
        # resize of a square to a square: the released centre crop to image_size would be a no-op
        x = F.interpolate(x, size=(self.cfg.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3|4, H, W] -> [B, num_tokens, out_dim] in the model's dtype."""
        tokens = self.model(pixel_values=self.preprocess(images)).last_hidden_state  # [B, 1 + N, hidden]
        return tokens if self.cfg.use_cls_token else tokens[:, 1:]


@dataclass
class SmallEncoderConfig:
    """A small trainable ViT; defaults are fast on CPU (17 tokens of width 64 from a 64-px recentred image)."""

    image_size: int = 64  # recentred input side
    patch_size: int = 8
    width: int = 64
    depth: int = 2  # transformer blocks
    heads: int = 4
    border_ratio: float = 0.15  # recentring margin

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the values cannot build the encoder."""
        for name in ("image_size", "patch_size", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"SmallEncoderConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"SmallEncoderConfig.patch_size: {self.patch_size} does not divide image_size "
                             f"{self.image_size}")
        if self.width % self.heads:
            raise ValueError(f"SmallEncoderConfig.heads: width {self.width} is not divisible by {self.heads} heads")
        _check_border("SmallEncoderConfig", self.border_ratio)


class SmallImageEncoder(nn.Module):
    """Recentre -> normalise (mean, std 0.5) -> conv patch embedding + learned CLS and positions -> pre-norm
    blocks -> LayerNorm: [B, 1 + (image_size / patch)^2, width]."""

    trainable = True

    def __init__(self, cfg: SmallEncoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.out_dim = cfg.width
        self.num_tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(SelfAttentionBlock(cfg.width, cfg.heads, qkv_bias=True, qk_norm=False)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3|4, H, W] -> [B, num_tokens, width]."""
        x = recenter(images, self.cfg.border_ratio, self.cfg.image_size)
        x = ((x - 0.5) / 0.5).to(self.patch_embed.weight.dtype)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, W]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # [B, 1 + N, W]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@dataclass
class ConditionerConfig:
    """Which image encoder conditions the DiT, and the condition dropout for classifier-free guidance."""

    kind: str = "small"  # small | dinov2
    small: SmallEncoderConfig = field(default_factory=SmallEncoderConfig)
    dinov2: DinoConfig = field(default_factory=DinoConfig)
    drop_prob: float = 0.1  # per-sample probability that training replaces the tokens by the unconditional ones

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field; only the chosen encoder's config is checked."""
        if self.kind not in _ENCODERS:
            raise ValueError(f"ConditionerConfig.kind: unknown encoder '{self.kind}' (choose from "
                             f"{', '.join(_ENCODERS)})")
        if not 0 <= self.drop_prob <= 1:
            raise ValueError(f"ConditionerConfig.drop_prob: must be in [0, 1], got {self.drop_prob}")
        getattr(self, self.kind).validate()


_ENCODERS = {"small": SmallImageEncoder, "dinov2": DinoImageEncoder}


class ImageConditioner(nn.Module):
    """Images -> condition tokens [B, num_tokens, out_dim], plus the unconditional tokens and condition dropout."""

    def __init__(self, cfg: ConditionerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.drop_prob = cfg.drop_prob
        self.main_image_encoder = _ENCODERS[cfg.kind](getattr(cfg, cfg.kind))

    @property
    def out_dim(self) -> int:
        """Token width D (the DiT's ``context_in_dim``)."""
        return self.main_image_encoder.out_dim

    @property
    def num_tokens(self) -> int:
        """Token count L."""
        return self.main_image_encoder.num_tokens

    @property
    def trainable(self) -> bool:
        """False for the frozen DINOv2."""
        return self.main_image_encoder.trainable

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3|4, H, W] in [0, 1], white background -> [B, L, D]."""
        return self.main_image_encoder(images)

    def unconditional(self, batch_size: int, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        """All-zero tokens [B, L, D]: the unconditional input of classifier-free guidance."""
        return torch.zeros(batch_size, self.num_tokens, self.out_dim, device=device, dtype=dtype)

    def drop(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each sample's tokens [B, L, D] by zeros with probability ``drop_prob`` (training only: the
        caller decides). ``generator`` may live on any device; the draw happens there."""
        device = generator.device if generator is not None else tokens.device
        keep = torch.rand(tokens.shape[0], generator=generator, device=device) >= self.drop_prob  # [B]
        return torch.where(keep.to(tokens.device)[:, None, None], tokens, torch.zeros_like(tokens))


def build_conditioner(cfg: ConditionerConfig) -> ImageConditioner:
    """The conditioner ``cfg`` describes (validated)."""
    return ImageConditioner(cfg)
