"""Hunyuan3D-2 VAE interop against synthetic checkpoints in the released layout.

The released key list and the released computation are written here independently of fvdm, from
reference-decoding.md sections 1 and 2: per-head interleaved fused projections, qk LayerNorm eps 1e-6,
block LayerNorms eps 1e-6, final LayerNorms eps 1e-5, output positive inside.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from fvdm.interop.hunyuan3d import HY2_TARGET, HY21_TARGET, InteropError, export_vae, load_vae
from fvdm.models.vae import NoEncoderError, VecSetVAE

SMALL = dict(num_latents=16, embed_dim=8, num_freqs=4, include_pi=False, heads=4, width=128, num_decoder_layers=2,
             qkv_bias=False, qk_norm=True, scale_factor=0.9990943042622529)
GEO_STD = dict(geo_decoder_mlp_expand_ratio=4, geo_decoder_downsample_ratio=1, geo_decoder_ln_post=True)
GEO_TURBO = dict(geo_decoder_mlp_expand_ratio=1, geo_decoder_downsample_ratio=2, geo_decoder_ln_post=False)
VARIANTS = {  # name: (target, params, has encoder, weights file)
    "v2-0": (HY2_TARGET, {**SMALL, **GEO_STD}, False, "model.fp16.safetensors"),
    "v2-0-turbo": (HY2_TARGET, {**SMALL, **GEO_TURBO}, False, "model.fp16.safetensors"),
    "v2-1": (HY21_TARGET, {**SMALL, "num_latents": 32, "scale_factor": 1.0039506158752403, "num_encoder_layers": 2,
                           **GEO_STD, "point_feats": 4, "pc_size": 640, "pc_sharpedge_size": 0},
             True, "model.fp16.ckpt"),
    "v2-0-withencoder": (HY2_TARGET, {**SMALL, "num_encoder_layers": 1, **GEO_STD, "point_feats": 4,
                                      "pc_size": 160, "pc_sharpedge_size": 160}, True, "model.fp16.safetensors"),
    # a config relying on the released constructor defaults: include_pi, qkv_bias on; qk_norm off
    "defaults": (HY2_TARGET, {k: SMALL[k] for k in ("num_latents", "embed_dim", "heads", "width",
                                                     "num_decoder_layers", "scale_factor")},
                 False, "model.safetensors"),
}


def value(params, key):
    defaults = dict(num_freqs=8, include_pi=True, qkv_bias=True, qk_norm=False, point_feats=3,
                    **GEO_STD)  # the released constructor's defaults
    return params.get(key, defaults.get(key))


# ----------------------------------------------------------------------------------------------------------
# the released layout, from the fact sheet
# ----------------------------------------------------------------------------------------------------------

def released_shapes(p: dict, with_encoder: bool) -> dict[str, tuple]:
    w, e, heads = p["width"], p["embed_dim"], p["heads"]
    hd = w // heads
    bias, qk = value(p, "qkv_bias"), value(p, "qk_norm")
    ratio, ln_post = value(p, "geo_decoder_downsample_ratio"), value(p, "geo_decoder_ln_post")
    wd = w // ratio
    fourier = 3 * (2 * value(p, "num_freqs") + 1)
    out: dict[str, tuple] = {}

    def ln(name, n):
        out[f"{name}.weight"], out[f"{name}.bias"] = (n,), (n,)

    def linear(name, o, i, has_bias=True):
        out[f"{name}.weight"] = (o, i)
        if has_bias:
            out[f"{name}.bias"] = (o,)

    def mlp(name, n, r):
        linear(f"{name}.c_fc", n * r, n)
        linear(f"{name}.c_proj", n, n * r)

    def qk_norms(name, use):
        if use:
            ln(f"{name}.attention.q_norm", hd)
            ln(f"{name}.attention.k_norm", hd)

    def self_block(name):
        ln(f"{name}.ln_1", w)
        linear(f"{name}.attn.c_qkv", 3 * w, w, bias)
        qk_norms(f"{name}.attn", qk)
        linear(f"{name}.attn.c_proj", w, w)
        ln(f"{name}.ln_2", w)
        mlp(f"{name}.mlp", w, 4)

    def cross_block(name, n, r, use_qk):
        for i in (1, 2, 3):
            ln(f"{name}.ln_{i}", n)
        linear(f"{name}.attn.c_q", n, n, bias)
        linear(f"{name}.attn.c_kv", 2 * n, n, bias)
        qk_norms(f"{name}.attn", use_qk)
        linear(f"{name}.attn.c_proj", n, n)
        mlp(f"{name}.mlp", n, r)

    linear("post_kl", w, e)
    for i in range(p["num_decoder_layers"]):
        self_block(f"transformer.resblocks.{i}")
    linear("geo_decoder.query_proj", wd, fourier)
    if ratio != 1:
        linear("geo_decoder.latents_proj", wd, w)
    cross_block("geo_decoder.cross_attn_decoder", wd, value(p, "geo_decoder_mlp_expand_ratio"), qk and ln_post)
    if ln_post:
        ln("geo_decoder.ln_post", wd)
    linear("geo_decoder.output_proj", 1, wd)
    if with_encoder:
        linear("pre_kl", 2 * e, w)
        linear("encoder.input_proj", w, fourier + value(p, "point_feats"))
        cross_block("encoder.cross_attn", w, 4, qk)
        for i in range(p["num_encoder_layers"]):
            self_block(f"encoder.self_attn.resblocks.{i}")
        ln("encoder.ln_post", w)
    return out


def random_state(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """fp16 values of a plausible scale: LayerNorm weights near 1, weights ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if len(shape) == 2:
            t = t / math.sqrt(shape[1])
        elif key.endswith("weight"):  # LayerNorm
            t = 1 + 0.1 * t
        else:
            t = 0.1 * t
        state[key] = t.half()
    return state


def write_folder(folder, name):
    target, params, with_encoder, weights = VARIANTS[name]
    state = random_state(released_shapes(params, with_encoder))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"target": target, "params": params}, sort_keys=False))
    if weights.endswith(".ckpt"):
        torch.save(state, folder / weights)
    else:
        save_file(state, str(folder / weights))
    return state


# ----------------------------------------------------------------------------------------------------------
# the released computation, by hand
# ----------------------------------------------------------------------------------------------------------

def layer_norm(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def linear(x, sd, name):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def per_head(t, heads, parts):
    """[B, N, heads * parts * d] viewed (B, N, heads, parts * d), split per head -> parts x [B, heads, N, d]."""
    b, n, _ = t.shape
    t = t.reshape(b, n, heads, parts, -1)
    return [t[:, :, :, i].transpose(1, 2) for i in range(parts)]


def attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = weights @ v  # [B, H, N, d]
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def mlp(x, sd, name):
    return linear(F.gelu(linear(x, sd, f"{name}.c_fc")), sd, f"{name}.c_proj")


def qk_normed(q, k, sd, name):
    if f"{name}.attention.q_norm.weight" not in sd:
        return q, k
    return layer_norm(q, sd, f"{name}.attention.q_norm", 1e-6), layer_norm(k, sd, f"{name}.attention.k_norm", 1e-6)


def ref_self_block(x, sd, name, heads):
    q, k, v = per_head(linear(layer_norm(x, sd, f"{name}.ln_1", 1e-6), sd, f"{name}.attn.c_qkv"), heads, 3)
    q, k = qk_normed(q, k, sd, f"{name}.attn")
    x = x + linear(attention(q, k, v), sd, f"{name}.attn.c_proj")
    return x + mlp(layer_norm(x, sd, f"{name}.ln_2", 1e-6), sd, f"{name}.mlp")


def ref_cross_block(x, data, sd, name, heads):
    (q,) = per_head(linear(layer_norm(x, sd, f"{name}.ln_1", 1e-6), sd, f"{name}.attn.c_q"), heads, 1)
    k, v = per_head(linear(layer_norm(data, sd, f"{name}.ln_2", 1e-6), sd, f"{name}.attn.c_kv"), heads, 2)
    q, k = qk_normed(q, k, sd, f"{name}.attn")
    x = x + linear(attention(q, k, v), sd, f"{name}.attn.c_proj")
    return x + mlp(layer_norm(x, sd, f"{name}.ln_3", 1e-6), sd, f"{name}.mlp")


def ref_fourier(x, p):
    freqs = 2.0 ** torch.arange(value(p, "num_freqs"), dtype=torch.float32)
    freqs = freqs * math.pi if value(p, "include_pi") else freqs
    phase = (x[..., :, None] * freqs).flatten(-2)
    return torch.cat([x, phase.sin(), phase.cos()], dim=-1)


def ref_field(sd, p, latents, points):
    """The released decoder: latents -> trunk -> geo decoder; positive inside."""
    x = linear(latents, sd, "post_kl")
    for i in range(p["num_decoder_layers"]):
        x = ref_self_block(x, sd, f"transformer.resblocks.{i}", p["heads"])
    if "geo_decoder.latents_proj.weight" in sd:
        x = linear(x, sd, "geo_decoder.latents_proj")
    heads = p["heads"] // value(p, "geo_decoder_downsample_ratio")
    q = linear(ref_fourier(points, p), sd, "geo_decoder.query_proj")
    q = ref_cross_block(q, x, sd, "geo_decoder.cross_attn_decoder", heads)
    if "geo_decoder.ln_post.weight" in sd:
        q = layer_norm(q, sd, "geo_decoder.ln_post", 1e-5)
    return linear(q, sd, "geo_decoder.output_proj").squeeze(-1)


def ref_moments(sd, p, surface, idx):
    """The released encoder for given query rows: moments [B, K, 2C]."""
    tokens = linear(torch.cat([ref_fourier(surface[..., :3], p), surface[..., 3:]], dim=-1), sd, "encoder.input_proj")
    x = torch.stack([tokens[b, idx[b]] for b in range(len(idx))])
    x = ref_cross_block(x, tokens, sd, "encoder.cross_attn", p["heads"])
    for i in range(p["num_encoder_layers"]):
        x = ref_self_block(x, sd, f"encoder.self_attn.resblocks.{i}", p["heads"])
    return linear(layer_norm(x, sd, "encoder.ln_post", 1e-5), sd, "pre_kl")


def fp32(state):
    return {k: v.float() for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,geo,encoder,keys,params", [
    ("v2-0", GEO_STD, 0, 266, 214_212_865),
    ("v2-0-turbo", GEO_TURBO, 0, 262, 203_690_497),
    ("v2-1", GEO_STD, 8, 410, 327_746_177),
])
def test_layout_generator_matches_fact_sheet(name, geo, encoder, keys, params):
    full = dict(num_latents=3072, embed_dim=64, num_freqs=8, include_pi=False, heads=16, width=1024,
                num_decoder_layers=16, qkv_bias=False, qk_norm=True, num_encoder_layers=encoder, point_feats=4, **geo)
    shapes = released_shapes(full, with_encoder=encoder > 0)
    assert len(shapes) == keys and sum(math.prod(s) for s in shapes.values()) == params


@pytest.mark.parametrize("name", list(VARIANTS))
def test_import_export_bit_exact(tmp_path, name):
    target, params, with_encoder, weights = VARIANTS[name]
    state = write_folder(tmp_path / "src", name)
    vae = load_vae(tmp_path / "src")
    assert vae.has_encoder == with_encoder
    assert vae.scale_factor == params["scale_factor"]
    out = export_vae(vae, tmp_path / "out", target=target)
    exported = load_file(out / "model.fp16.safetensors")
    assert exported.keys() == state.keys()
    for key, t in state.items():
        assert exported[key].dtype == torch.float16 and torch.equal(exported[key], t), key
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["target"] == target
    for key, v in params.items():
        assert config["params"][key] == v and type(config["params"][key]) is type(v), key
    for key, v in config["params"].items():  # keys the source left to defaults are written out explicitly
        assert v == value(params, key), key
    assert load_vae(out).cfg == vae.cfg


@pytest.mark.parametrize("name", list(VARIANTS))
def test_field_is_minus_released_field(tmp_path, name):
    _, params, _, _ = VARIANTS[name]
    sd = fp32(write_folder(tmp_path, name))
    vae = load_vae(tmp_path).eval()
    latents = torch.randn(2, params["num_latents"], params["embed_dim"])
    points = torch.rand(2, 50, 3) * 2.02 - 1.01
    with torch.no_grad():
        ours = vae.query(vae.decode(latents), points)
    released = ref_field(sd, params, latents, points)
    torch.testing.assert_close(ours, -released, atol=1e-5, rtol=1e-5)
    assert torch.equal(vae.geo_decoder.output_proj.weight, -sd["geo_decoder.output_proj.weight"])
    assert released.abs().mean() > 0.05  # not a degenerate all-zero comparison


@pytest.mark.parametrize("name", ["v2-1", "v2-0-withencoder"])
def test_encoder_matches_released_encoder(tmp_path, name):
    _, params, _, _ = VARIANTS[name]
    sd = fp32(write_folder(tmp_path, name))
    vae = load_vae(tmp_path).eval()
    n = params["pc_size"] + params["pc_sharpedge_size"]
    xyz = torch.nn.functional.normalize(torch.randn(2, n, 3), dim=-1)
    flag = (torch.arange(n) >= params["pc_size"]).float().expand(2, n)[..., None]
    surface = torch.cat([xyz, xyz, flag], dim=-1)
    idx = torch.stack([torch.randperm(n)[:params["num_latents"]] for _ in range(2)])
    with torch.no_grad():
        ours = vae.pre_kl(vae.encoder(surface, idx))
        posterior = vae.encode_posterior(surface)
    torch.testing.assert_close(ours, ref_moments(sd, params, surface, idx), atol=1e-5, rtol=1e-5)
    assert posterior.mean.shape == (2, params["num_latents"], params["embed_dim"])


def test_one_cross_attention_block_by_hand(tmp_path):
    """The geo decoder's block against the fact sheet: interleaved heads, qk-norm eps 1e-6, LN eps 1e-6."""
    sd = fp32(write_folder(tmp_path, "v2-0"))
    block = load_vae(tmp_path).geo_decoder.block
    assert block.attn.q_norm.eps == 1e-6 and block.norm_q.eps == 1e-6
    # inputs of tiny variance (~1e-6), where the LayerNorm eps decides the output
    x, data = 1e-3 * torch.randn(2, 7, 128), 1e-3 * torch.randn(2, 16, 128)
    with torch.no_grad():
        ours = block(x, data)
    name = "geo_decoder.cross_attn_decoder"
    torch.testing.assert_close(ours, ref_cross_block(x, data, sd, name, heads=4), atol=1e-5, rtol=1e-5)
    grouped = dict(sd, **{f"{name}.attn.c_kv.weight": load_vae(tmp_path).geo_decoder.block.attn.kv.weight})
    assert not torch.allclose(ref_cross_block(x, data, grouped, name, heads=4), ours, atol=1e-3)  # layout matters


def test_final_layer_norms_use_eps_1e5(tmp_path):
    write_folder(tmp_path, "v2-1")
    vae = load_vae(tmp_path)
    assert vae.geo_decoder.norm_out.eps == 1e-5 and vae.encoder.norm_out.eps == 1e-5


def test_decoder_only_file_has_no_encoder(tmp_path):
    write_folder(tmp_path, "v2-0-turbo")
    vae = load_vae(tmp_path / "model.fp16.safetensors")  # a weights file beside its config works too
    assert not vae.has_encoder
    with pytest.raises(NoEncoderError):
        vae.encode(torch.zeros(1, 100, 7))


def test_missing_extra_and_misshaped_keys_are_named(tmp_path):
    state = write_folder(tmp_path, "v2-0")
    weights = tmp_path / "model.fp16.safetensors"
    bad = dict(state)
    del bad["transformer.resblocks.1.attn.c_proj.bias"]
    bad["geo_decoder.extra.weight"] = torch.zeros(3)
    bad["post_kl.weight"] = torch.zeros(128, 9, dtype=torch.float16)
    save_file(bad, str(weights))
    with pytest.raises(InteropError) as err:
        load_vae(tmp_path)
    message = str(err.value)
    for part in ("transformer.resblocks.1.attn.c_proj.bias", "geo_decoder.extra.weight", "post_kl.weight (128, 9)",
                 str(weights)):
        assert part in message


def test_config_problems_are_named(tmp_path):
    write_folder(tmp_path, "v2-0")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for change, expected in [({"width": None}, "params lack required keys: width"),
                             ({"flash": 1}, "unknown ShapeVAE params: flash"),
                             ({"qk_norm": "yes"}, "params.qk_norm must be bool"),
                             ({"drop_path_rate": 0.1}, "drop_path_rate")]:
        params = {k: v for k, v in {**config["params"], **change}.items() if v is not None}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({"target": HY2_TARGET, "params": params}))
        with pytest.raises(InteropError, match=expected):
            load_vae(tmp_path)
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(InteropError, match="config.yaml: missing"):
        load_vae(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InteropError, match="no weights file"):
        load_vae(tmp_path / "empty")


def test_export_fp32_and_refuses_inexpressible_configs(tmp_path):
    write_folder(tmp_path / "src", "v2-0")
    vae = load_vae(tmp_path / "src")
    vae.scale_factor = 1.25  # e.g. measured by a later stage
    out = export_vae(vae, tmp_path / "fp32", dtype=torch.float32)
    assert (out / "model.safetensors").is_file()
    again = load_vae(out)
    assert again.scale_factor == 1.25
    for (k, a), b in zip(vae.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    untied = VecSetVAE(dataclasses.replace(vae.cfg, geo_ln_post=False, geo_qk_norm=True))
    with pytest.raises(InteropError, match="geo_qk_norm"):
        export_vae(untied, tmp_path / "bad")
