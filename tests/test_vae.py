"""VecSetVAE: shapes per preset, fp32 Fourier under autocast, posterior, query chunking, FPS, pools, FLOPs."""
import dataclasses
import math

import pytest
import torch

from fvdm.config import load_config
from fvdm.decoding.kv_selection import KVSelection, query_with_kv_selection
from fvdm.models.embedding import FourierEmbedder
from fvdm.models.vae import (NoEncoderError, VAEConfig, VecSetVAE, _fps_torch, efficient_geo_decoder,
                             farthest_point_sample, flops_per_query, select_queries, vae_preset)
from fvdm.stages.vae import VAEStage, VAEStageConfig, init_posterior_logvar

MICRO = dict(num_latents=32, embed_dim=8, width=64, heads=4, num_encoder_layers=1, num_decoder_layers=2,
             pc_size=512)  # tiny's structure at test-friendly sizes


def micro(**kw) -> VAEConfig:
    return dataclasses.replace(vae_preset("tiny"), **{**MICRO, **kw})


def surface(b: int, n: int, sharp: int = 0) -> torch.Tensor:
    """[B, n + sharp, 7]: points on the unit sphere with normals, flag 1 on the last ``sharp`` rows."""
    xyz = torch.nn.functional.normalize(torch.randn(b, n + sharp, 3), dim=-1)
    flag = torch.zeros(b, n + sharp, 1)
    flag[:, n:] = 1.0
    return torch.cat([xyz, xyz, flag], dim=-1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("efficient", [False, True])
def test_tiny_round_trip_shapes(efficient):
    cfg = vae_preset("tiny", efficient=efficient)
    vae = VecSetVAE(cfg)
    s = surface(2, 4096)
    posterior = vae.encode_posterior(s)
    assert posterior.mean.shape == (2, cfg.num_latents, cfg.embed_dim)
    kl = posterior.kl()
    assert kl.shape == (2,) and torch.isfinite(kl).all() and (kl >= 0).all()
    assert torch.equal(posterior.mode(), posterior.mean)
    latents = vae.encode(s)
    assert latents.shape == (2, cfg.num_latents, cfg.embed_dim)
    tokens = vae.decode(latents)
    assert tokens.shape == (2, cfg.num_latents, cfg.width)
    sdf = vae.query(tokens, torch.rand(2, 300, 3) * 2 - 1)
    assert sdf.shape == (2, 300) and torch.isfinite(sdf).all()


@pytest.mark.parametrize("name", ["base", "large"])
@pytest.mark.parametrize("efficient", [False, True])
def test_big_presets_on_meta(name, efficient):
    cfg = vae_preset(name, efficient=efficient)
    with torch.device("meta"):
        vae = VecSetVAE(cfg)
        tokens = vae.decode(torch.empty(2, cfg.num_latents, cfg.embed_dim))
        sdf = vae.query(tokens, torch.empty(2, 100, 3))
    assert tokens.shape == (2, cfg.num_latents, cfg.width) and sdf.shape == (2, 100)


def test_large_matches_released_parameter_counts():
    """large = Hunyuan3D-2 sizes: parameter counts of the released files (reference-decoding.md section 2)."""
    def count(cfg):
        with torch.device("meta"):
            return sum(p.numel() for p in VecSetVAE(cfg).parameters())
    large = vae_preset("large")
    assert (large.num_latents, large.embed_dim, large.width, large.heads) == (3072, 64, 1024, 16)
    assert count(dataclasses.replace(large, with_encoder=False)) == 214_212_865  # v2-0
    assert count(dataclasses.replace(vae_preset("large", efficient=True), with_encoder=False)) == 203_690_497  # turbo
    assert count(large) == 327_746_177  # v2-1 (encoder, 4 point features)


def test_efficient_geo_decoder_knobs():
    cfg = efficient_geo_decoder(vae_preset("base"))
    assert (cfg.geo_downsample_ratio, cfg.geo_mlp_ratio, cfg.geo_ln_post, cfg.geo_qk_norm) == (2, 1, False, False)
    vae = VecSetVAE(micro(geo_downsample_ratio=2, geo_mlp_ratio=1, geo_ln_post=False, geo_qk_norm=False))
    g = vae.geo_decoder
    assert g.latents_proj.weight.shape == (32, 64) and g.block.mlp.fc1.weight.shape == (32, 32)
    assert isinstance(g.norm_out, torch.nn.Identity) and isinstance(g.block.attn.q_norm, torch.nn.Identity)


def test_efficient_flops_at_least_70_percent_lower():
    std, eff = flops_per_query(vae_preset("large")), flops_per_query(vae_preset("large", efficient=True))
    assert std == 2 * 16_830_464  # 16.8 M multiply-adds per query, 3072 keys (reference-decoding.md 6)
    assert 1 - eff / std >= 0.70  # paper: -76.6 %; this count: -74.9 %
    assert flops_per_query(vae_preset("large"), num_keys=1024) < std  # fewer keys, cheaper


def test_fourier_fp32_under_bf16_autocast():
    emb = FourierEmbedder(num_freqs=8, include_pi=False)
    x = torch.rand(2, 5, 3) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emb(x)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 51)
    freqs = 2.0 ** torch.arange(8, dtype=torch.float64)
    phase = (x.double()[..., :, None] * freqs).reshape(2, 5, 24)  # input-dimension major
    expected = torch.cat([x.double(), phase.sin(), phase.cos()], dim=-1)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)
    phase_bf16 = (x.bfloat16()[..., :, None] * freqs.bfloat16()).reshape(2, 5, 24)
    assert (phase_bf16.double().sin() - expected[..., 3:27]).abs().max() > 1e-3  # what fp32 avoids


def test_include_pi_scales_frequencies():
    x = torch.rand(4, 3)
    a, b = FourierEmbedder(4, include_pi=True)(x), FourierEmbedder(4, include_pi=False)(x * math.pi)
    torch.testing.assert_close(a[:, 3:], b[:, 3:])


def test_bf16_autocast_forward_is_finite():
    vae = VecSetVAE(micro())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sdf, posterior = vae(surface(2, 512), torch.rand(2, 64, 3))
    assert sdf.dtype == torch.bfloat16 and torch.isfinite(sdf.float()).all()
    assert torch.isfinite(posterior.kl()).all()


def test_chunked_query_equals_unchunked_and_kv_attend():
    vae = VecSetVAE(micro()).eval()
    tokens = vae.decode(torch.randn(2, 32, 8))
    points = torch.rand(2, 1000, 3) * 2 - 1
    with torch.no_grad():
        full = vae.query(tokens, points, chunk_size=None)
        torch.testing.assert_close(vae.query(tokens, points, chunk_size=128), full)
        torch.testing.assert_close(vae.geo_decoder.attend(points, *vae.geo_decoder.kv(tokens)), full)
        torch.testing.assert_close(vae.geo_decoder(tokens, points), full)


def test_decoder_only_cannot_encode():
    vae = VecSetVAE(micro(with_encoder=False))
    assert not vae.has_encoder and vae.encoder is None
    with pytest.raises(NoEncoderError, match="no encoder"):
        vae.encode(surface(1, 512))
    assert vae.query(vae.decode(torch.randn(1, 32, 8)), torch.rand(1, 10, 3)).shape == (1, 10)


def test_bad_inputs_are_named():
    vae = VecSetVAE(micro())
    with pytest.raises(ValueError, match=r"\[B, N, 7\]"):
        vae.encode(torch.randn(1, 512, 6))
    with pytest.raises(ValueError, match="8 channels"):
        vae.decode(torch.randn(1, 32, 9))
    with pytest.raises(ValueError, match="heads"):
        VecSetVAE(micro(heads=3))
    with pytest.raises(ValueError, match="uniform pool holds 16 points"):
        vae.encode(surface(1, 16))


def test_scale_factor_survives_state_dict_and_dtype_casts():
    vae = VecSetVAE(micro(scale_factor=0.9990943042622529))
    assert vae.scale_factor == 0.9990943042622529
    vae.scale_factor = 1.0039506158752403
    other = VecSetVAE(micro())
    other.load_state_dict(vae.state_dict())
    assert other.half().scale_factor == 1.0039506158752403


def test_fps_picks_spread_points_and_both_backends_agree():
    # 8 tight clusters at the cube corners: 8 FPS picks take one point from each cluster
    corners = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=torch.float32)
    pts = (corners[:, None] + 0.01 * torch.randn(8, 50, 3)).reshape(1, 400, 3).repeat(2, 1, 1)
    idx = farthest_point_sample(pts, 8)
    assert idx.shape == (2, 8)
    for row in idx:
        assert sorted((row // 50).tolist()) == list(range(8))
    start = torch.tensor([3, 201])
    cloud = torch.rand(2, 300, 3)
    torch.manual_seed(1)
    cpu = farthest_point_sample(cloud, 40)
    torch.manual_seed(1)
    assert torch.equal(_fps_torch(cloud, 40, torch.randint(300, (2,))), cpu)
    assert torch.equal(_fps_torch(cloud, 40, start)[:, 0], start)


def test_queries_come_from_both_pools_in_proportion():
    cfg = micro(pc_size=384, pc_sharpedge_size=128, encoder_downsample_ratio=4)
    s = surface(3, 384, sharp=128)
    idx = select_queries(s, cfg)
    assert idx.shape == (3, 32)
    assert ((idx < 384).sum(1) == 24).all() and ((idx >= 384).sum(1) == 8).all()  # 3 : 1
    assert all(len(set(row.tolist())) == 32 for row in idx)
    random_pick = select_queries(s, dataclasses.replace(cfg, use_fps=False))
    assert ((random_pick < 384).sum(1) == 24).all()
    with pytest.raises(ValueError, match="pc_size \\+ pc_sharpedge_size"):
        select_queries(surface(1, 400, sharp=128), cfg)
    with pytest.raises(ValueError, match="sharp-edge flag"):
        select_queries(surface(1, 256, sharp=256), cfg)


def test_compiled_query_pieces_compute_the_same():
    """compile_queries fuses the work around attention; exact attention and KV selection give what eager gives,
    for point counts that change from call to call (dynamic shapes), and the state dict keys stay put."""
    vae = VecSetVAE(efficient_geo_decoder(micro())).eval()
    keys = set(vae.state_dict())
    tokens = vae.decode(torch.randn(1, 32, 8))
    points = [torch.rand(1, n, 3) * 2 - 1 for n in (1000, 333, 2048)]
    sel = KVSelection(topk=1 / 3, group_size=64, chunk_size=512)
    with torch.no_grad():
        eager = [(vae.query(tokens, p), query_with_kv_selection(vae, tokens, p, sel)) for p in points]
        vae.geo_decoder.compile_queries()
        for p, (exact, selected) in zip(points, eager):
            torch.testing.assert_close(vae.query(tokens, p), exact, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(query_with_kv_selection(vae, tokens, p, sel), selected, rtol=1e-4, atol=1e-5)
    assert set(vae.state_dict()) == keys


def test_posterior_logvar_init_sets_the_initial_posterior_std():
    """posterior_logvar_init starts the sampled latents near their means (std ~ exp(value / 2)); the default
    init leaves them mostly noise (std ~ 1). A VAE without an encoder has no posterior to initialize."""
    torch.manual_seed(0)
    surface = torch.randn(2, 256, 7)
    cfg = load_config(VAEStageConfig, overrides=["data.train=unused", "data.val=unused", "vae.num_latents=32",
                                                 "vae.pc_size=256", "posterior_logvar_init=-4"])
    with torch.no_grad():
        shifted = VAEStage(cfg).vae.encode_posterior(surface)
        default = VAEStage(load_config(VAEStageConfig, overrides=["data.train=unused", "data.val=unused",
                                                                  "vae.num_latents=32", "vae.pc_size=256"])
                           ).vae.encode_posterior(surface)
    assert abs(shifted.logvar.mean().item() + 4.0) < 0.3 and shifted.std.mean().item() < 0.2
    assert abs(default.logvar.mean().item()) < 0.3 and default.std.mean().item() > 0.8
    with pytest.raises(ValueError, match="no encoder"):
        init_posterior_logvar(VecSetVAE(VAEConfig(num_latents=32, with_encoder=False)), -4.0)
