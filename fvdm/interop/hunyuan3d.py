"""Hunyuan3D-2 checkpoints <-> fvdm models (reference-decoding.md section 2).

A released model folder holds ``config.yaml`` (``target`` + ``params``) beside its weights,
``model[.fp16].safetensors`` or ``model[.fp16].ckpt`` (a plain state dict). Keys map through an explicit
rename table; the only tensors that change are named once:

- fused projections: released files interleave heads ``[q_h | k_h | v_h]`` (``c_qkv``) and ``[k_h | v_h]``
  (``c_kv``); fvdm groups them ``[q | k | v]`` / ``[k | v]``. A pure row permutation, so exact;
- the geo decoder's output projection: the released field is positive inside, fvdm's negative inside,
  so weight and bias are negated (exact in any float format).

The helpers above the VAE section are shared with the DiT importer.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from fvdm.models.conditioner import (ConditionerConfig, DinoConfig, ImageConditioner, build_conditioner,
                                     dinov2_from_legacy, dinov2_to_legacy)
from fvdm.models.dit import DiTConfig, FlowDiT
from fvdm.models.vae import VAEConfig, VecSetVAE

HY2_TARGET = "hy3dgen.shapegen.models.ShapeVAE"  # Hunyuan3D-2 / -2mini / -2mv VAE folders
HY21_TARGET = "hy3dshape.models.ShapeVAE"  # Hunyuan3D-2.1 VAE folder
WEIGHT_FILES = ("model.fp16.safetensors", "model.safetensors", "model.fp16.ckpt", "model.ckpt")  # search order


class InteropError(ValueError):
    """A released folder or checkpoint that cannot be mapped; the message names the file and the keys."""


# ---------------------------------------------------------------------------------------------------------
# Released folders and state dicts (shared by every model kind)
# ---------------------------------------------------------------------------------------------------------

def read_released(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(config mapping, state dict, weights file) of a released folder, or of a weights file beside its config."""
    path = Path(path)
    if path.is_file():
        folder, weights = path.parent, path
    elif path.is_dir():
        folder = path
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise InteropError(f"{path}: no weights file (looked for {', '.join(WEIGHT_FILES)})")
        weights = found[0]
    else:
        raise InteropError(f"{path}: no such file or folder")
    config_file = folder / "config.yaml"
    config = read_config(config_file)
    if not isinstance(config, dict) or not isinstance(config.get("params"), dict):
        raise InteropError(f"{config_file}: expected a mapping with 'target' and a 'params' mapping")
    return config, read_state_dict(weights), weights


def read_config(config_file: Path) -> Any:
    """The parsed ``config.yaml`` of a released folder."""
    if not config_file.is_file():
        raise InteropError(f"{config_file}: missing (a released folder has config.yaml beside the weights)")
    try:
        return yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as e:
        raise InteropError(f"{config_file}: cannot parse YAML: {e}") from e


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a ``.ckpt`` holding a plain state dict."""
    try:
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                  weights_only=True)
    except Exception as e:  # corrupt file, not a checkpoint, unsafe pickle
        raise InteropError(f"{path}: cannot read weights: {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InteropError(f"{path}: expected a plain state dict of tensors")
    return dict(state)


def write_released(out_dir: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor],
                   dtype: torch.dtype) -> Path:
    """Write ``config.yaml`` and the weights (``model.fp16.safetensors`` for fp16, as released, else
    ``model.safetensors``) into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    name = "model.fp16.safetensors" if dtype == torch.float16 else "model.safetensors"
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, str(out / name))
    return out


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state(expected: dict[str, torch.Size], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict match of a released state dict against ``expected`` shapes: missing, unexpected and mis-shaped
    keys are all reported at once, each by name."""
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [f"{k} {tuple(state[k].shape)} (config: {tuple(s)})" for k, s in sorted(expected.items())
              if k in state and state[k].shape != s]
    problems = ([f"missing keys: {_listing(missing)}"] if missing else []) + \
               ([f"unexpected keys: {_listing(unexpected)}"] if unexpected else []) + \
               ([f"shape mismatch: {_listing(shapes)}"] if shapes else [])
    if problems:
        raise InteropError(f"{source}: checkpoint does not match its config; " + "; ".join(problems))


def per_head_to_grouped(w: torch.Tensor, parts: int, head_dim: int) -> torch.Tensor:
    """Rows [h0: p0 p1 .., h1: p0 p1 .., ...] -> [p0: h0 h1 .., p1: h0 h1 .., ...] (weight or bias)."""
    heads = w.shape[0] // (parts * head_dim)
    return w.reshape(heads, parts, head_dim, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def grouped_to_per_head(w: torch.Tensor, parts: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`per_head_to_grouped`."""
    heads = w.shape[0] // (parts * head_dim)
    return w.reshape(parts, heads, head_dim, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------
# VAE (ShapeVAE)
# ---------------------------------------------------------------------------------------------------------

_VAE_RENAMES = [  # fvdm key -> released key, applied in order
    (r"^trunk\.", "transformer.resblocks."),
    (r"^encoder\.layers\.", "encoder.self_attn.resblocks."),
    (r"^encoder\.cross\.", "encoder.cross_attn."),
    (r"^geo_decoder\.block\.", "geo_decoder.cross_attn_decoder."),
    (r"^(encoder|geo_decoder)\.norm_out\.", r"\1.ln_post."),
    (r"\.norm1\.", ".ln_1."), (r"\.norm2\.", ".ln_2."),  # self-attention blocks
    (r"\.norm_q\.", ".ln_1."), (r"\.norm_kv\.", ".ln_2."), (r"\.norm_mlp\.", ".ln_3."),  # cross-attention blocks
    (r"\.attn\.(qkv|q|kv|proj)\.", r".attn.c_\1."),
    (r"\.attn\.(q_norm|k_norm)\.", r".attn.attention.\1."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."), (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]
_FUSED_PARTS = [(re.compile(r"\.attn\.qkv\.(weight|bias)$"), 3), (re.compile(r"\.attn\.kv\.(weight|bias)$"), 2)]
_NEGATED = re.compile(r"^geo_decoder\.output_proj\.")  # released: positive inside; fvdm: negative inside
_FVDM_ONLY = {"latent_scale_bits"}  # stored in config.yaml (scale_factor), not among the released tensors

# constructor defaults of the released ShapeVAE (reference-decoding.md 1.1), used for keys a config omits;
# they differ from fvdm's defaults and from the shipped values
_RELEASED_DEFAULTS: dict[str, Any] = dict(
    num_freqs=8, include_pi=True, qkv_bias=True, qk_norm=False, num_encoder_layers=8, point_feats=3,
    pc_size=5120, pc_sharpedge_size=5120, downsample_ratio=20, geo_decoder_mlp_expand_ratio=4,
    geo_decoder_downsample_ratio=1, geo_decoder_ln_post=True, scale_factor=1.0)
_REQUIRED = ("num_latents", "embed_dim", "width", "heads", "num_decoder_layers")
_INERT = {"label_type": None, "drop_path_rate": 0.0, "use_ln_post": True}  # accepted value (None: any)
# released param -> VAEConfig field, in the order the released files list them
_PARAM_FIELDS = {
    "num_latents": "num_latents", "embed_dim": "embed_dim", "num_freqs": "num_freqs", "include_pi": "include_pi",
    "heads": "heads", "width": "width", "num_encoder_layers": "num_encoder_layers",
    "num_decoder_layers": "num_decoder_layers", "qkv_bias": "qkv_bias", "qk_norm": "qk_norm",
    "scale_factor": "scale_factor", "geo_decoder_mlp_expand_ratio": "geo_mlp_ratio",
    "geo_decoder_downsample_ratio": "geo_downsample_ratio", "geo_decoder_ln_post": "geo_ln_post",
    "point_feats": "point_feats", "pc_size": "pc_size", "pc_sharpedge_size": "pc_sharpedge_size",
    "downsample_ratio": "encoder_downsample_ratio",
}
_ENCODER_PARAMS = ("num_encoder_layers", "point_feats", "pc_size", "pc_sharpedge_size", "downsample_ratio")


def released_vae_key(key: str) -> str:
    """The released name of an fvdm ``VecSetVAE`` state-dict key."""
    for pattern, replacement in _VAE_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _fused_parts(key: str) -> int:
    return next((parts for pattern, parts in _FUSED_PARTS if pattern.search(key)), 0)


def vae_config_from_params(params: Mapping[str, Any], with_encoder: bool, source: str) -> VAEConfig:
    """``VAEConfig`` from a released ``params`` block; absent keys take the released constructor defaults."""
    unknown = params.keys() - _PARAM_FIELDS.keys() - _INERT.keys()
    if unknown:
        raise InteropError(f"{source}: unknown ShapeVAE params: {_listing(unknown)}")
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise InteropError(f"{source}: params lack required keys: {', '.join(missing)}")
    for key, accepted in _INERT.items():
        if key in params and accepted is not None and params[key] != accepted:
            raise InteropError(f"{source}: params.{key} = {params[key]!r} is not supported "
                               f"(fvdm computes {accepted!r})")
    values = {**_RELEASED_DEFAULTS, **{k: v for k, v in params.items() if k in _PARAM_FIELDS}}
    kwargs: dict[str, Any] = {}
    for key, name in _PARAM_FIELDS.items():
        kind = type(VAEConfig.__dataclass_fields__[name].default)  # bool, int or float
        kwargs[name] = _typed(values[key], kind, f"{source}: params.{key}")
    cfg = VAEConfig(**kwargs, with_encoder=with_encoder, mlp_ratio=4, use_fps=True,
                    geo_qk_norm=kwargs["qk_norm"] and kwargs["geo_ln_post"])  # ln_post off turns qk-norm off too
    try:
        cfg.validate()
    except ValueError as e:
        raise InteropError(f"{source}: {e}") from e
    return cfg


def _typed(value: Any, kind: type, where: str) -> Any:
    """``value`` as ``kind`` (bool, int or float; an int is a valid float, a bool is neither number)."""
    numbers = (int, float) if kind is float else (int,)
    if isinstance(value, bool) != (kind is bool) or (kind is not bool and not isinstance(value, numbers)):
        raise InteropError(f"{where} must be {kind.__name__}, got {value!r}")
    return kind(value)


def vae_from_released(params: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                      source: str = "checkpoint") -> VecSetVAE:
    """A float32 ``VecSetVAE`` from a released ``params`` block and state dict (also a DiT bundle's ``vae.*``
    part with the prefix stripped). Strict: every key consumed, every parameter filled, shapes equal."""
    with_encoder = any(k.startswith(("encoder.", "pre_kl.")) for k in state)
    cfg = vae_config_from_params(params, with_encoder, source)
    with torch.device("meta"):
        vae = VecSetVAE(cfg)
    names = {k: released_vae_key(k) for k in vae.state_dict() if k not in _FVDM_ONLY}
    check_state({names[k]: t.shape for k, t in vae.state_dict().items() if k in names}, state, source)
    head_dim = cfg.width // cfg.heads
    converted = {}
    for key, name in names.items():
        t = state[name]
        if parts := _fused_parts(key):
            t = per_head_to_grouped(t, parts, head_dim)
        converted[key] = -t if _NEGATED.search(key) else t
    vae.to_empty(device="cpu")
    result = vae.load_state_dict(converted, strict=False)
    assert set(result.missing_keys) == _FVDM_ONLY and not result.unexpected_keys, result
    vae.scale_factor = cfg.scale_factor
    return vae


def released_vae_params(vae: VecSetVAE) -> dict[str, Any]:
    """The released ``params`` block describing ``vae`` (keys in the released order)."""
    cfg = vae.cfg
    if cfg.mlp_ratio != 4:
        raise InteropError(f"cannot export: mlp_ratio {cfg.mlp_ratio} (the released ShapeVAE fixes it at 4)")
    if cfg.geo_qk_norm != (cfg.qk_norm and cfg.geo_ln_post):
        raise InteropError(f"cannot export: geo_qk_norm={cfg.geo_qk_norm} but the released ShapeVAE uses qk-norm in "
                           f"the geo decoder exactly when qk_norm and geo_ln_post (here {cfg.qk_norm}, "
                           f"{cfg.geo_ln_post})")
    params = {}
    for key, name in _PARAM_FIELDS.items():
        if key in _ENCODER_PARAMS and not vae.has_encoder:
            continue
        if key == "downsample_ratio" and cfg.encoder_downsample_ratio == _RELEASED_DEFAULTS[key]:
            continue  # the released files leave it at its default
        params[key] = getattr(cfg, name)
    params["scale_factor"] = vae.scale_factor  # the live value, which training may have set
    return params


def released_vae_state(vae: VecSetVAE) -> dict[str, torch.Tensor]:
    """``vae``'s tensors under the released names and layout (sign restored)."""
    head_dim = vae.cfg.width // vae.cfg.heads
    out = {}
    for key, t in vae.state_dict().items():
        if key in _FVDM_ONLY:
            continue
        t = -t if _NEGATED.search(key) else t
        if parts := _fused_parts(key):
            t = grouped_to_per_head(t, parts, head_dim)
        out[released_vae_key(key)] = t
    return out


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> VecSetVAE:
    """A ``VecSetVAE`` from a released Hunyuan3D-2 VAE folder (or its weights file); decoder-only files give a
    model without an encoder. Every value comes from ``config.yaml``; the field is negative inside."""
    config, state, weights = read_released(path)
    return vae_from_released(config["params"], state, source=str(weights)).to(dtype)


def export_vae(vae: VecSetVAE, out_dir: str | Path, dtype: torch.dtype = torch.float16,
               target: str = HY2_TARGET) -> Path:
    """Write ``vae`` as a released folder (config.yaml + weights) that the Hunyuan3D-2 code loads strictly and
    evaluates to the same field with its sign (positive inside). ``target``: HY2_TARGET or HY21_TARGET."""
    return write_released(out_dir, {"target": target, "params": released_vae_params(vae)}, released_vae_state(vae),
                          dtype)


# ---------------------------------------------------------------------------------------------------------
# DiT bundles (Hunyuan3DDiT + ShapeVAE + image conditioner)
# ---------------------------------------------------------------------------------------------------------

DIT_TARGET = "hy3dgen.shapegen.models.Hunyuan3DDiT"
CONDITIONER_TARGET = "hy3dgen.shapegen.models.SingleImageEncoder"
EULER_SCHEDULER = {"target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
                   "params": {"num_train_timesteps": 1000}}
IMAGE_PROCESSOR = {"target": "hy3dgen.shapegen.preprocessors.ImageProcessorV2",
                   "params": {"size": 512, "border_ratio": 0.15}}
PIPELINE = {"target": "hy3dgen.shapegen.pipelines.Hunyuan3DDiTFlowMatchingPipeline"}
BUNDLE_PARTS = ("model", "vae", "conditioner")  # config sections and key prefixes of a bundle
_DIT_FIELDS = ("in_channels", "context_in_dim", "hidden_size", "mlp_ratio", "num_heads", "depth",
               "depth_single_blocks", "qkv_bias", "guidance_embed")  # released params = DiTConfig fields
_DIT_INERT = {"theta": None, "time_factor": 1000}  # accepted value (None: any); positional encoding is unused


class DiTBundle(NamedTuple):
    """What a released DiT folder holds: the DiT, and the VAE and conditioner when their parts are present."""

    dit: FlowDiT
    vae: Optional[VecSetVAE]
    conditioner: Optional[ImageConditioner]
    config: dict[str, Any]  # the whole config.yaml (scheduler and image-processor sections included)


def _bundle_files(path: Path) -> tuple[dict[str, Any], Path]:
    folder = path.parent if path.is_file() else path
    config_file = folder / "config.yaml"
    config = read_config(config_file)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) \
            or not isinstance(config["model"].get("params"), dict):
        raise InteropError(f"{config_file}: expected a 'model' section with 'params' (a DiT bundle config)")
    if path.is_file():
        return config, path
    found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not found:
        raise InteropError(f"{path}: no weights file (looked for {', '.join(WEIGHT_FILES)})")
    return config, found[0]


def _bundle_state(weights: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{part: state dict} from prefixed safetensors keys or a ``.ckpt`` dict of state dicts."""
    if weights.suffix == ".safetensors":
        flat = read_state_dict(weights)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in flat.items():
            part, _, rest = key.partition(".")
            if part not in BUNDLE_PARTS or not rest:
                raise InteropError(f"{weights}: key '{key}' has no model./vae./conditioner. prefix")
            parts.setdefault(part, {})[rest] = t
        return parts
    try:
        raw = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InteropError(f"{weights}: cannot read weights: {e}") from e
    if not isinstance(raw, Mapping) or not set(raw) <= set(BUNDLE_PARTS) or \
            not all(isinstance(sd, Mapping) for sd in raw.values()):
        raise InteropError(f"{weights}: expected a dict of state dicts under {', '.join(BUNDLE_PARTS)}")
    return {part: dict(sd) for part, sd in raw.items()}


def dit_config_from_params(params: Mapping[str, Any], source: str) -> DiTConfig:
    """``DiTConfig`` from a released ``model.params`` block; every field is required."""
    unknown = params.keys() - set(_DIT_FIELDS) - _DIT_INERT.keys() - {"axes_dim"}
    missing = [k for k in _DIT_FIELDS if k not in params and k != "guidance_embed"]
    if unknown or missing:
        raise InteropError(f"{source}: model.params " + "; ".join(
            ([f"unknown keys: {_listing(unknown)}"] if unknown else []) +
            ([f"missing keys: {', '.join(missing)}"] if missing else [])))
    for key, accepted in _DIT_INERT.items():
        if key in params and accepted is not None and params[key] != accepted:
            raise InteropError(f"{source}: model.params.{key} = {params[key]!r} is not supported (fvdm computes "
                               f"{accepted!r})")
    kwargs = {}
    for key in _DIT_FIELDS:
        kind = type(DiTConfig.__dataclass_fields__[key].default)
        kwargs[key] = _typed(params.get(key, False), kind, f"{source}: model.params.{key}")
    cfg = DiTConfig(**kwargs)
    try:
        cfg.validate()
    except ValueError as e:
        raise InteropError(f"{source}: {e}") from e
    head_dim = cfg.hidden_size // cfg.num_heads
    if "axes_dim" in params and sum(params["axes_dim"]) != head_dim:
        raise InteropError(f"{source}: model.params.axes_dim {params['axes_dim']} must sum to the head dim {head_dim}")
    return cfg


def _conditioner_config(section: Mapping[str, Any], source: str) -> ConditionerConfig:
    """The DINOv2 ``ConditionerConfig`` of a released ``conditioner`` section."""
    main = (section.get("params") or {}).get("main_image_encoder") or {}
    if main.get("type") != "DinoImageEncoder":
        raise InteropError(f"{source}: conditioner main_image_encoder type {main.get('type')!r} is not supported "
                           "(fvdm loads DinoImageEncoder)")
    kwargs = main.get("kwargs") or {}
    unknown = kwargs.keys() - {"config", "image_size", "use_cls_token"}
    if unknown:
        raise InteropError(f"{source}: conditioner kwargs: unknown keys {_listing(unknown)}")
    dino = DinoConfig(config=dict(kwargs.get("config") or {}), image_size=int(kwargs.get("image_size", 518)),
                      use_cls_token=bool(kwargs.get("use_cls_token", True)))
    return ConditionerConfig(kind="dinov2", dinov2=dino)


def _dino_keys(state: Mapping[str, torch.Tensor], convert) -> dict[str, torch.Tensor]:
    """Apply a DINOv2 key-layout conversion under the conditioner's ``main_image_encoder.model.`` prefix.
    The released bundles use the transformers 4.x names; fvdm's encoder is built by transformers 5."""
    prefix = "main_image_encoder.model."
    inner = convert({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return {**{k: v for k, v in state.items() if not k.startswith(prefix)}, **{prefix + k: v for k, v in inner.items()}}


def load_dit_bundle(path: str | Path, dinov2_weights: str | Path | None = None) -> DiTBundle:
    """Everything a released Hunyuan3D-2 DiT folder (or its weights file) holds. Only the ``model`` part is
    required; ``vae`` loads through the VAE importer and ``conditioner`` into the DINOv2 conditioner when their
    keys are present. A bundle stripped of its image encoder takes it from ``dinov2_weights`` (a local
    Dinov2Model state dict or ``save_pretrained`` folder) when given. Strict key coverage within each part."""
    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path}: no such file or folder")
    config, weights = _bundle_files(path)
    parts = _bundle_state(weights)
    source = str(weights)
    if "model" not in parts:
        raise InteropError(f"{source}: no model.* keys (not a DiT bundle)")
    cfg = dit_config_from_params(config["model"]["params"], source)
    with torch.device("meta"):
        dit = FlowDiT(cfg)
    check_state({k: t.shape for k, t in dit.state_dict().items()}, parts["model"], f"{source} (model part)")
    dit.to_empty(device="cpu")
    dit.load_state_dict(parts["model"])
    vae = None
    if "vae" in parts:
        if not isinstance((config.get("vae") or {}).get("params"), dict):
            raise InteropError(f"{source}: vae.* keys but no vae section with params in config.yaml")
        vae = vae_from_released(config["vae"]["params"], parts["vae"], f"{source} (vae part)")
    conditioner = None
    if "conditioner" in parts or dinov2_weights is not None:
        if not isinstance(config.get("conditioner"), dict):
            raise InteropError(f"{source}: conditioner weights but no conditioner section in config.yaml")
        cond_cfg = _conditioner_config(config["conditioner"], source)
        if "conditioner" in parts:
            conditioner = build_conditioner(cond_cfg)
            state = _dino_keys(parts["conditioner"], dinov2_from_legacy)
            check_state({k: t.shape for k, t in conditioner.state_dict().items()}, state,
                        f"{source} (conditioner part)")
            conditioner.load_state_dict(state)
        else:
            cond_cfg.dinov2.weights = str(dinov2_weights)
            conditioner = build_conditioner(cond_cfg)
    return DiTBundle(dit, vae, conditioner, config)


def load_dit(path: str | Path) -> FlowDiT:
    """The ``FlowDiT`` of a released Hunyuan3D-2 DiT folder (see :func:`load_dit_bundle` for the other parts)."""
    return load_dit_bundle(path).dit


def released_dit_params(dit: FlowDiT) -> dict[str, Any]:
    cfg = dit.cfg
    params = {k: getattr(cfg, k) for k in _DIT_FIELDS}
    params["axes_dim"] = [cfg.hidden_size // cfg.num_heads]
    params["theta"] = 10000
    return params


def export_dit(dit: FlowDiT, out_dir: str | Path, vae: VecSetVAE | None = None,
               conditioner: ImageConditioner | None = None, dtype: torch.dtype = torch.float16,
               scheduler: Mapping[str, Any] | None = None) -> Path:
    """Write a released-layout DiT bundle (config.yaml + ``model[.fp16].safetensors`` with ``model.``, ``vae.``,
    ``conditioner.`` keys) that the public Hunyuan3D-2 pipeline loads. The conditioner part is written for a
    DINOv2 conditioner only (the public code has no class for fvdm's small encoder); ``scheduler`` defaults to
    the Euler flow-matching scheduler of the base models."""
    config: dict[str, Any] = {"model": {"target": DIT_TARGET, "params": released_dit_params(dit)}}
    state = {f"model.{k}": t for k, t in dit.state_dict().items()}
    if vae is not None:
        config["vae"] = {"target": HY2_TARGET, "params": released_vae_params(vae)}
        state.update({f"vae.{k}": t for k, t in released_vae_state(vae).items()})
    if conditioner is not None:
        if conditioner.cfg.kind != "dinov2":
            raise InteropError(f"cannot export a '{conditioner.cfg.kind}' conditioner: the public Hunyuan3D-2 code "
                               "loads DINOv2 image encoders only (export without it)")
        d = conditioner.cfg.dinov2
        kwargs = {"config": dict(d.config), "image_size": d.image_size, "use_cls_token": d.use_cls_token}
        config["conditioner"] = {"target": CONDITIONER_TARGET,
                                 "params": {"main_image_encoder": {"type": "DinoImageEncoder", "kwargs": kwargs}}}
        legacy = _dino_keys(conditioner.state_dict(), dinov2_to_legacy)
        state.update({f"conditioner.{k}": t for k, t in legacy.items()})
    config["scheduler"] = dict(scheduler or EULER_SCHEDULER)
    config["image_processor"] = IMAGE_PROCESSOR
    config["pipeline"] = PIPELINE
    return write_released(out_dir, config, state, dtype)
