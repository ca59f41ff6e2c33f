"""Hunyuan3D-2 DiT bundles: a synthetic bundle in the released layout (random values) imports and exports
bit-exactly, with its VAE and DINOv2 conditioner parts, from safetensors and from a dict-of-state-dicts .ckpt.

The model part's key names are checked against an independent list in test_dit.py, the VAE part's in
test_interop_vae.py; the conditioner part here is what transformers' ``save_pretrained`` writes for a
Dinov2Model (the layout of the released bundles), prefixed ``main_image_encoder.model.``.
"""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fvdm.interop.hunyuan3d import (HY2_TARGET, InteropError, export_dit, load_dit, load_dit_bundle,
                                    released_vae_params, released_vae_state)
from fvdm.models.dit import DiTConfig, FlowDiT
from fvdm.models.vae import VAEConfig, VecSetVAE

DIT_PARAMS = dict(in_channels=8, context_in_dim=32, hidden_size=64, mlp_ratio=4.0, num_heads=4, depth=2,
                  depth_single_blocks=2, axes_dim=[16], theta=10000, qkv_bias=True, guidance_embed=True)
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, patch_size=14, image_size=28,
            layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=True, qkv_bias=True, hidden_act="gelu",
            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, drop_path_rate=0.0, num_channels=3,
            model_type="dinov2")


def _random_like(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).half() for k, v in state.items()}


@pytest.fixture(scope="module")
def bundle_parts(tmp_path_factory):
    """{part: released state dict (fp16)} and the config mapping of a small guidance-distilled bundle."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        dit = FlowDiT(DiTConfig(**{k: v for k, v in DIT_PARAMS.items() if k not in ("axes_dim", "theta")}))
    vae = VecSetVAE(VAEConfig(num_latents=16, embed_dim=8, width=64, heads=4, num_decoder_layers=1,
                              with_encoder=False, scale_factor=0.99909))
    folder = tmp_path_factory.mktemp("dino")
    Dinov2Model(Dinov2Config(**DINO)).save_pretrained(folder)
    dino = load_file(folder / "model.safetensors")
    parts = {
        "model": _random_like(dit.state_dict(), 0),
        "vae": _random_like(released_vae_state(vae), 1),
        "conditioner": {f"main_image_encoder.model.{k}": v for k, v in _random_like(dino, 2).items()},
    }
    config = {
        "model": {"target": "hy3dgen.shapegen.models.Hunyuan3DDiT", "params": DIT_PARAMS},
        "vae": {"target": HY2_TARGET, "params": released_vae_params(vae)},
        "conditioner": {"target": "hy3dgen.shapegen.models.SingleImageEncoder", "params": {"main_image_encoder": {
            "type": "DinoImageEncoder", "kwargs": {"config": DINO, "image_size": 28}}}},
        "scheduler": {"target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
                      "params": {"num_train_timesteps": 1000}},
    }
    return parts, config


def _write(folder, parts, config, kind: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if kind == "safetensors":
        save_file({f"{p}.{k}": v for p, sd in parts.items() for k, v in sd.items()}, folder / "model.fp16.safetensors")
    else:
        torch.save(parts, folder / "model.fp16.ckpt")
    return folder


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_bundle_imports_and_exports_bit_exactly(tmp_path, bundle_parts, kind):
    parts, config = bundle_parts
    src = _write(tmp_path / "src", parts, config, kind)
    bundle = load_dit_bundle(src)
    assert bundle.dit.cfg.guidance_embed and bundle.dit.cfg.hidden_size == 64
    assert bundle.vae is not None and bundle.conditioner is not None
    assert bundle.vae.scale_factor == 0.99909
    out = export_dit(bundle.dit, tmp_path / "out", vae=bundle.vae, conditioner=bundle.conditioner)
    written = load_file(out / "model.fp16.safetensors")
    expected = {f"{p}.{k}": v for p, sd in parts.items() for k, v in sd.items()}
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    exported = yaml.safe_load((out / "config.yaml").read_text())
    assert exported["model"]["params"] == DIT_PARAMS
    assert exported["conditioner"]["params"]["main_image_encoder"]["kwargs"]["config"] == DINO
    assert exported["vae"]["params"]["scale_factor"] == 0.99909
    # and the export reads back into the same modules
    again = load_dit_bundle(out)
    x, t, cond = torch.randn(1, 16, 8), torch.tensor([0.3]), torch.randn(1, 5, 32)
    w = torch.tensor([5.0])
    assert torch.equal(again.dit(x, t, cond, guidance=w), bundle.dit(x, t, cond, guidance=w))


def test_conditioner_part_computes_the_saved_dinov2(tmp_path, bundle_parts):
    """The imported conditioner's tokens are those of a transformers Dinov2Model holding the same weights."""
    from transformers import Dinov2Config, Dinov2Model

    parts, config = bundle_parts
    bundle = load_dit_bundle(_write(tmp_path / "src", parts, config, "safetensors"))
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k.removeprefix("main_image_encoder.model."): v.float() for k, v in parts["conditioner"].items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text(Dinov2Config(**DINO).to_json_string())
    reference = Dinov2Model.from_pretrained(folder, local_files_only=True).eval()
    images = torch.rand(2, 3, 40, 40)
    enc = bundle.conditioner.main_image_encoder
    with torch.no_grad():
        torch.testing.assert_close(bundle.conditioner(images),
                                   reference(pixel_values=enc.preprocess(images)).last_hidden_state)


def test_model_only_bundle_and_strict_errors(tmp_path, bundle_parts):
    parts, config = bundle_parts
    src = _write(tmp_path / "model-only", {"model": parts["model"]}, {"model": config["model"]}, "safetensors")
    bundle = load_dit_bundle(src)
    assert bundle.vae is None and bundle.conditioner is None
    assert isinstance(load_dit(src), FlowDiT)

    broken = dict(parts["model"])
    del broken["double_blocks.1.img_attn.norm.key_norm.scale"]
    broken["double_blocks.1.extra.weight"] = torch.zeros(1)
    src = _write(tmp_path / "broken", {"model": broken}, {"model": config["model"]}, "safetensors")
    with pytest.raises(InteropError, match=r"missing keys: double_blocks\.1\.img_attn\.norm\.key_norm\.scale.*"
                                           r"unexpected keys: double_blocks\.1\.extra\.weight"):
        load_dit(src)

    bad = {"model": {**config["model"], "params": {**DIT_PARAMS, "hidden_sz": 3}}}
    src = _write(tmp_path / "typo", {"model": parts["model"]}, bad, "safetensors")
    with pytest.raises(InteropError, match="unknown keys: hidden_sz"):
        load_dit(src)


def test_export_refuses_the_small_conditioner(tmp_path):
    from fvdm.models.conditioner import ConditionerConfig, build_conditioner

    dit = FlowDiT(DiTConfig())
    with pytest.raises(InteropError, match="DINOv2"):
        export_dit(dit, tmp_path / "x", conditioner=build_conditioner(ConditionerConfig(kind="small")))
