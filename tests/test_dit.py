"""FlowDiT: released key names and parameter count, hand-computed embedding and blocks, guidance, taps, training."""
import dataclasses
import math

import pytest
import torch

from fvdm.models.dit import (DiTConfig, DoubleStreamBlock, FlowDiT, SingleStreamBlock, dit_preset,
                             timestep_embedding)

MICRO = dict(in_channels=6, context_in_dim=10, hidden_size=32, num_heads=4, depth=2, depth_single_blocks=2)


def micro(**kw) -> DiTConfig:
    return dataclasses.replace(dit_preset("tiny"), **{**MICRO, **kw})


def inputs(cfg: DiTConfig, b: int = 2, n: int = 7, lc: int = 5):
    return torch.randn(b, n, cfg.in_channels), torch.rand(b), torch.randn(b, lc, cfg.context_in_dim)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- hand-written reference pieces (independent of the module's code) ----

def linear(x, lin):
    return x @ lin.weight.T + lin.bias if lin.bias is not None else x @ lin.weight.T


def layer_norm(x):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt((x - mu).square().mean(-1, keepdim=True) + 1e-6)


def rms_norm(x, scale):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * scale


def silu(x):
    return x / (1 + torch.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def mod_chunks(vec, lin, n):
    """n chunks of lin(silu(vec)), each [B, 1, W]."""
    out = linear(silu(vec), lin)
    w = out.shape[-1] // n
    return [out[:, None, i * w:(i + 1) * w] for i in range(n)]


def split_qkv(qkv, heads, qk_norm):
    """[B, L, 3W] laid out [q | k | v], heads in order -> lists over heads of [B, L, D], q and k RMS-normed."""
    w = qkv.shape[-1] // 3
    d = w // heads
    q, k, v = qkv[..., :w], qkv[..., w:2 * w], qkv[..., 2 * w:]
    qs = [rms_norm(q[..., h * d:(h + 1) * d], qk_norm.query_norm.scale) for h in range(heads)]
    ks = [rms_norm(k[..., h * d:(h + 1) * d], qk_norm.key_norm.scale) for h in range(heads)]
    vs = [v[..., h * d:(h + 1) * d] for h in range(heads)]
    return qs, ks, vs


def attention(qs, ks, vs):
    """Per head softmax(q k^T / sqrt(d)) v, heads concatenated: [B, L, H * D]."""
    outs = []
    for q, k, v in zip(qs, ks, vs):
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        outs.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(outs, dim=-1)


def randomize_norm_scales(module):
    """RMSNorm scales start at ones; make them random so the tests see them."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.scale"):
                p.copy_(1 + 0.5 * torch.randn_like(p))


# ---- tests ----

def expected_keys(cfg: DiTConfig) -> set[str]:
    """The released checkpoint's key names, built from the naming scheme."""
    keys = {f"{m}.{p}" for m in ("latent_in", "cond_in", "time_in.in_layer", "time_in.out_layer",
                                 "final_layer.adaLN_modulation.1", "final_layer.linear") for p in ("weight", "bias")}
    if cfg.guidance_embed:
        keys |= {f"guidance_in.{m}.{p}" for m in ("in_layer", "out_layer") for p in ("weight", "bias")}
    for i in range(cfg.depth):
        for s in ("img", "txt"):
            pre = f"double_blocks.{i}.{s}"
            keys |= {f"{pre}_{m}.{p}" for m in ("mod.lin", "attn.proj", "mlp.0", "mlp.2") for p in ("weight", "bias")}
            keys |= {f"{pre}_attn.qkv.weight", f"{pre}_attn.qkv.bias"}
            keys |= {f"{pre}_attn.norm.query_norm.scale", f"{pre}_attn.norm.key_norm.scale"}
    for j in range(cfg.depth_single_blocks):
        pre = f"single_blocks.{j}"
        keys |= {f"{pre}.{m}.{p}" for m in ("linear1", "linear2", "modulation.lin") for p in ("weight", "bias")}
        keys |= {f"{pre}.norm.query_norm.scale", f"{pre}.norm.key_norm.scale"}
    return keys


def expected_count(cfg: DiTConfig) -> int:
    h, c, ctx, m, hd = cfg.hidden_size, cfg.in_channels, cfg.context_in_dim, int(cfg.hidden_size * cfg.mlp_ratio), \
        cfg.hidden_size // cfg.num_heads
    embedder = 256 * h + h + h * h + h
    top = (c * h + h) + embedder * (2 if cfg.guidance_embed else 1) + (ctx * h + h) + (h * 2 * h + 2 * h) + (h * c + c)
    stream = (h * 6 * h + 6 * h) + (h * 3 * h + 3 * h) + 2 * hd + (h * h + h) + (h * m + m + m * h + h)
    single = (h * (3 * h + m) + 3 * h + m) + ((h + m) * h + h) + 2 * hd + (h * 3 * h + 3 * h)
    return top + cfg.depth * 2 * stream + cfg.depth_single_blocks * single


def test_large_keys_and_parameter_count():
    cfg = dataclasses.replace(dit_preset("large"), guidance_embed=True)
    with torch.device("meta"):
        model = FlowDiT(cfg)
    count = sum(p.numel() for p in model.parameters())
    print(f"large + guidance: {count:,} parameters")
    assert count == expected_count(cfg)
    assert 1.0e9 < count < 1.2e9
    keys = set(model.state_dict())
    assert keys == expected_keys(cfg)
    for key in ("double_blocks.15.img_attn.norm.query_norm.scale", "single_blocks.31.linear1.weight",
                "final_layer.adaLN_modulation.1.weight", "time_in.in_layer.weight", "cond_in.weight",
                "latent_in.bias", "guidance_in.out_layer.bias"):
        assert key in keys
    assert not any("norm" in k and not k.endswith("scale") for k in keys)  # LayerNorms carry no weights


@pytest.mark.parametrize("name", ["tiny", "mini", "large"])
def test_preset_counts(name):
    cfg = dit_preset(name)
    with torch.device("meta"):
        model = FlowDiT(cfg)
    count = sum(p.numel() for p in model.parameters())
    print(f"{name}: {count:,} parameters")
    assert count == expected_count(cfg) and set(model.state_dict()) == expected_keys(cfg)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_preset("huge")
    with pytest.raises(ValueError, match="num_heads"):
        FlowDiT(micro(num_heads=5))
    with pytest.raises(ValueError, match="depth"):
        FlowDiT(micro(depth=-1))


def test_timestep_embedding_by_hand():
    t = torch.tensor([0.0, 0.37, 1.0])
    for dim in (4, 256):
        emb = timestep_embedding(t, dim)
        assert emb.dtype == torch.float32 and emb.shape == (3, dim)
        half = dim // 2
        for b, tb in enumerate(t.tolist()):
            for i in range(half):
                arg = 1000.0 * tb * math.exp(-math.log(10000) * i / half)
                assert emb[b, i].item() == pytest.approx(math.cos(arg), abs=2e-4)
                assert emb[b, half + i].item() == pytest.approx(math.sin(arg), abs=2e-4)
    assert timestep_embedding(t.half()).dtype == torch.float32


def test_double_stream_block_by_hand():
    b, n, lc, w, heads = 2, 6, 4, 32, 4
    block = DoubleStreamBlock(w, heads, mlp_ratio=2.0, qkv_bias=True)
    randomize_norm_scales(block)
    img, txt, vec = torch.randn(b, n, w), torch.randn(b, lc, w), torch.randn(b, w)
    with torch.no_grad():
        got_img, got_txt = block(img, txt, vec)

        streams = {}
        for s, x in (("img", img), ("txt", txt)):
            shift1, scale1, gate1, shift2, scale2, gate2 = mod_chunks(vec, getattr(block, f"{s}_mod").lin, 6)
            attn = getattr(block, f"{s}_attn")
            qkv = linear((1 + scale1) * layer_norm(x) + shift1, attn.qkv)
            streams[s] = (split_qkv(qkv, heads, attn.norm), gate1, shift2, scale2, gate2)
        joint = [[torch.cat([t_, i_], dim=1) for t_, i_ in zip(streams["txt"][0][j], streams["img"][0][j])]
                 for j in range(3)]  # condition tokens first
        out = attention(*joint)
        parts = {"txt": out[:, :lc], "img": out[:, lc:]}
        want = {}
        for s, x in (("img", img), ("txt", txt)):
            _, gate1, shift2, scale2, gate2 = streams[s]
            x = x + gate1 * linear(parts[s], getattr(block, f"{s}_attn").proj)
            mlp = getattr(block, f"{s}_mlp")
            hidden = gelu_tanh(linear((1 + scale2) * layer_norm(x) + shift2, mlp[0]))
            want[s] = x + gate2 * linear(hidden, mlp[2])
    torch.testing.assert_close(got_img, want["img"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_txt, want["txt"], atol=1e-5, rtol=1e-5)


def test_single_stream_block_by_hand():
    b, n, w, heads = 2, 9, 32, 4
    block = SingleStreamBlock(w, heads, mlp_ratio=2.0)
    randomize_norm_scales(block)
    x, vec = torch.randn(b, n, w), torch.randn(b, w)
    with torch.no_grad():
        got = block(x, vec)
        shift, scale, gate = mod_chunks(vec, block.modulation.lin, 3)
        h1 = linear((1 + scale) * layer_norm(x) + shift, block.linear1)
        attn = attention(*split_qkv(h1[..., :3 * w], heads, block.norm))
        want = x + gate * linear(torch.cat([attn, gelu_tanh(h1[..., 3 * w:])], dim=-1), block.linear2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_forward_and_guidance_embedding():
    cfg = micro()
    model = FlowDiT(cfg)
    x, t, cond = inputs(cfg)
    with torch.no_grad():
        before = model(x, t, cond)
    assert before.shape == x.shape
    with pytest.raises(ValueError, match="guidance must be None"):
        model(x, t, cond, guidance=torch.ones(2))

    model.add_guidance_embedding()
    assert model.cfg.guidance_embed and not cfg.guidance_embed  # the caller's config is left alone
    with pytest.raises(ValueError, match="pass guidance"):
        model(x, t, cond)
    with pytest.raises(RuntimeError, match="already"):
        model.add_guidance_embedding()
    with torch.no_grad():
        for w in (0.0, 1.0, 3.5, 7.5):
            assert torch.equal(model(x, t, cond, guidance=torch.full((2,), w)), before)
        torch.nn.init.normal_(model.guidance_in.out_layer.weight, std=0.1)
        outs = [model(x, t, cond, guidance=torch.full((2,), w)) for w in (1.0, 5.0)]
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)
    assert set(model.state_dict()) == expected_keys(model.cfg)


def test_features():
    cfg = micro()
    model = FlowDiT(cfg)
    x, t, cond = inputs(cfg)
    with torch.no_grad():
        feats = model.features(x, t, cond, ["single.1", "double.0", "double.1"])
        vec = model.modulation_vector(t)
        torch.testing.assert_close(model.final_layer(feats[0], vec), model(x, t, cond), atol=0, rtol=0)
    assert all(f.shape == (2, 7, cfg.hidden_size) for f in feats)
    for bad in (["double.2"], ["single.-1"], ["final"], []):
        with pytest.raises(ValueError):
            model.features(x, t, cond, bad)


def test_tiny_trains():
    cfg = dit_preset("tiny")
    model = FlowDiT(cfg)
    model.add_guidance_embedding()
    torch.nn.init.normal_(model.guidance_in.out_layer.weight, std=0.02)
    x, t, cond = inputs(cfg, b=2, n=16, lc=8)
    guidance = torch.tensor([2.0, 5.0])
    target = torch.randn_like(x)

    def loss_fn():
        return (model(x, t, cond, guidance) - target).square().mean()

    loss_fn().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.no_grad():
        start = loss_fn().item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * start, (start, loss.item())


def test_activation_checkpointing_and_compiled_blocks_compute_the_same():
    dit = FlowDiT(dit_preset("tiny"))
    x, t = torch.randn(2, 16, 32), torch.rand(2)
    cond = torch.randn(2, 5, 64)

    def output_and_grads():
        dit.zero_grad()
        out = dit(x, t, cond)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in dit.parameters()]

    plain, plain_grads = output_and_grads()
    dit.checkpoint_blocks = True
    recomputed, recomputed_grads = output_and_grads()
    torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)
    for a, b in zip(recomputed_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    dit.compile_blocks()
    assert set(dit.state_dict()) == {k for k, _ in FlowDiT(dit_preset("tiny")).named_parameters()} | {
        k for k, _ in FlowDiT(dit_preset("tiny")).named_buffers()}
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, cond), plain, rtol=1e-5, atol=1e-5)
