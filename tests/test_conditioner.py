"""Image conditioner: recentring, DINOv2 weights and preprocessing, the small ViT, unconditional tokens, dropout."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fvdm.models.conditioner import (IMAGENET_MEAN, IMAGENET_STD, ConditionerConfig, DinoConfig, DinoImageEncoder,
                                     SmallEncoderConfig, SmallImageEncoder, build_conditioner, recenter)

TINY_DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, patch_size=14,
                 image_size=42, use_swiglu_ffn=True, layerscale_value=1.0, qkv_bias=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def hf_model():
    """A randomly initialised tiny Dinov2Model with non-trivial layer scales, in eval mode."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    model = Dinov2Model(Dinov2Config(**TINY_DINO)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name:
                p.uniform_(0.5, 1.5)
    return model


def dino_cfg(**kw) -> DinoConfig:
    return DinoConfig(**{"config": dict(TINY_DINO), "image_size": 42, **kw})


def off_centre_square() -> torch.Tensor:
    """[1, 3, 128, 96]: white with a black 40 x 30 box (rows 10..50, cols 50..80)."""
    img = torch.ones(1, 3, 128, 96)
    img[:, :, 10:50, 50:80] = 0.0
    return img


def dark_bbox(img: torch.Tensor) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), exclusive ends, of the pixels darker than 0.5 in [3, H, W]."""
    ys, xs = torch.nonzero(img.mean(dim=0) < 0.5, as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def test_recenter_centres_and_scales_the_object():
    out = recenter(off_centre_square(), border_ratio=0.15, size=64)
    assert out.shape == (1, 3, 64, 64) and 0 <= out.min() and out.max() <= 1
    y0, y1, x0, x1 = dark_bbox(out[0])
    assert abs((y1 - y0) - 0.85 * 64) <= 2  # the long side (40 px) fills 85 % of the canvas
    assert abs((x1 - x0) - 0.85 * 64 * 30 / 40) <= 2
    assert abs((y0 + y1) / 2 - 32) <= 1 and abs((x0 + x1) / 2 - 32) <= 1
    assert out[0, :, :2].min() > 0.99 and out[0, :, :, :2].min() > 0.99  # white margins


def test_recenter_rgba_uses_alpha_and_composites_on_white():
    rgba = torch.zeros(1, 4, 64, 64)  # black RGB everywhere, alpha only on the object
    rgba[:, :3, 40:60, 4:24] = 0.2
    rgba[:, 3, 40:60, 4:24] = 1.0
    out = recenter(rgba, border_ratio=0.15, size=40)
    y0, y1, x0, x1 = dark_bbox(out[0])
    assert abs((y1 - y0) - 34) <= 2 and abs((x1 - x0) - 34) <= 2
    assert abs((y0 + y1) / 2 - 20) <= 1 and abs((x0 + x1) / 2 - 20) <= 1
    assert out[0, :, 20, 20].sub(0.2).abs().max() < 0.02  # object colour kept
    assert out[0, :, 0, 0].min() > 0.99  # transparent black became white


def test_recenter_empty_image_passes_through():
    img = torch.ones(2, 3, 32, 32)
    img[1] = 0.99  # near-white, above the threshold: still no object
    out = recenter(img, size=16)
    assert out.shape == (2, 3, 16, 16)
    assert torch.allclose(out[1], torch.full_like(out[1], 0.99), atol=1e-5)


def test_recenter_rejects_bad_input():
    with pytest.raises(ValueError, match="border_ratio"):
        recenter(torch.ones(1, 3, 8, 8), border_ratio=1.0)
    with pytest.raises(ValueError, match="expected"):
        recenter(torch.ones(1, 2, 8, 8))


def reference_tokens(model, images: torch.Tensor, image_size: int = 42) -> torch.Tensor:
    """The HF model applied to our own rendition of the released preprocessing."""
    x = recenter(images, 0.15, 512)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


@pytest.mark.parametrize("use_cls", [True, False])
def test_dino_encoder_shapes(use_cls):
    enc = DinoImageEncoder(dino_cfg(use_cls_token=use_cls))
    out = enc(torch.rand(2, 3, 48, 48))
    assert out.shape == (2, 9 + int(use_cls), 32) == (2, enc.num_tokens, enc.out_dim)


def test_dino_weights_from_safetensors_file(tmp_path, hf_model):
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, path)
    enc = DinoImageEncoder(dino_cfg(weights=str(path)))
    images = off_centre_square()
    assert torch.allclose(enc(images), reference_tokens(hf_model, images), atol=1e-5)
    assert not any(t.is_meta or t.requires_grad for t in enc.parameters()) and not enc.training


def test_dino_weights_from_save_pretrained_dir(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "dino")  # transformers writes the legacy (4.x) key layout here
    enc = DinoImageEncoder(dino_cfg(weights=str(tmp_path / "dino")))
    images = torch.rand(2, 3, 40, 40)
    assert torch.allclose(enc(images), reference_tokens(hf_model, images), atol=1e-5)


def test_dino_weights_from_pt_file(tmp_path, hf_model):
    path = tmp_path / "dino.pt"
    torch.save(hf_model.state_dict(), path)
    enc = DinoImageEncoder(dino_cfg(weights=str(path), use_cls_token=False))
    images = off_centre_square()
    assert torch.allclose(enc(images), reference_tokens(hf_model, images)[:, 1:], atol=1e-5)


def test_dino_weights_missing_key_names_file_and_key(tmp_path, hf_model):
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    del state["layernorm.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError, match=r"broken\.safetensors.*layernorm\.weight"):
        DinoImageEncoder(dino_cfg(weights=str(path)))
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        DinoImageEncoder(dino_cfg(weights=str(tmp_path / "absent.safetensors")))


def test_dino_frozen_and_stays_in_eval():
    cond = build_conditioner(ConditionerConfig(kind="dinov2", dinov2=dino_cfg()))
    cond.train()
    enc = cond.main_image_encoder
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in cond.parameters()) and not cond.trainable
    assert cond.out_dim == 32 and cond.num_tokens == 10
    assert all(k.startswith("main_image_encoder.model.") for k in cond.state_dict())
    assert "main_image_encoder.model.embeddings.cls_token" in cond.state_dict()


def test_config_validation():
    with pytest.raises(ValueError, match="ConditionerConfig.kind"):
        ConditionerConfig(kind="clip").validate()
    with pytest.raises(ValueError, match="ConditionerConfig.drop_prob"):
        ConditionerConfig(drop_prob=1.5).validate()
    with pytest.raises(ValueError, match="DinoConfig.image_size"):
        dino_cfg(image_size=40).validate()
    with pytest.raises(ValueError, match="DinoConfig.config"):
        dino_cfg(config={**TINY_DINO, "hiden_size": 8}).validate()
    with pytest.raises(ValueError, match="SmallEncoderConfig.patch_size"):
        SmallEncoderConfig(patch_size=7).validate()
    assert DinoConfig().config["hidden_size"] == 1536  # released ViT-giant/14 default, not built here


def test_small_encoder_shape_and_gradients():
    cond = build_conditioner(ConditionerConfig())
    enc = cond.main_image_encoder
    assert isinstance(enc, SmallImageEncoder) and cond.trainable
    out = cond(torch.rand(2, 3, 128, 128))
    assert out.shape == (2, 65, 64) == (2, cond.num_tokens, cond.out_dim)
    out.square().mean().backward()
    assert enc.patch_embed.weight.grad is not None and enc.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.requires_grad for p in cond.parameters())


def test_small_encoder_accepts_rgba():
    enc = SmallImageEncoder(dataclasses.replace(SmallEncoderConfig(), image_size=32))
    assert enc(torch.rand(1, 4, 48, 48)).shape == (1, 17, 64)


def test_unconditional_and_drop():
    cond = build_conditioner(ConditionerConfig(drop_prob=0.5))
    uncond = cond.unconditional(3, device="cpu", dtype=torch.float16)
    assert uncond.shape == (3, cond.num_tokens, cond.out_dim) and uncond.dtype == torch.float16
    assert not uncond.any()

    tokens = torch.randn(2000, 2, 4) + 3.0
    dropped = cond.drop(tokens, generator=torch.Generator().manual_seed(0))
    zero = (dropped == 0).all(dim=(1, 2))
    kept = (dropped == tokens).all(dim=(1, 2))
    assert bool((zero | kept).all())  # whole samples, never parts
    assert 0.45 < zero.float().mean() < 0.55
    again = cond.drop(tokens, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)

    cond.drop_prob = 1.0
    assert not cond.drop(tokens).any()
    cond.drop_prob = 0.0
    assert torch.equal(cond.drop(tokens), tokens)
