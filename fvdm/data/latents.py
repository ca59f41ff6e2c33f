"""Latent shards (``fvdm cache-latents``): the frozen VAE's posterior of every shape, written once, so the
teacher and distillation stages stream latents instead of encoding point clouds at every step.

One WebDataset sample per shape: ``latent.npy`` float32 [2, N, C] = posterior mean and standard deviation,
both already multiplied by the scale factor (so a draw mean + std * eps is a DiT-space latent), the shape's
renders (``render_XX.png``, copied bytes) and ``meta.json``. ``latents.json`` beside the shards records the
scale factor and a fingerprint of the VAE, which the stages check against the VAE they load. The encoder's
own randomness (query sampling, point subsets) is frozen into the one posterior stored per shape.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from fvdm.config import DataConfig
from fvdm.data.shards import (MalformedSample, ShardWriter, decode_renders, decode_sample, npy_array, npy_bytes,
                              read_samples)

LATENT = "latent.npy"
INDEX = "latents.json"


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """SHA-1 of the VAE's encoder-side tensors (what determines the latents), independent of the scale."""
    h = hashlib.sha1()
    for key, t in sorted(vae.state_dict().items()):
        if key.startswith(("encoder.", "pre_kl.")):
            h.update(key.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def read_index(latents: str | Path) -> dict[str, Any]:
    """``latents.json`` of a latent-shard directory (or of the directory of a shard pattern)."""
    spec = Path(str(latents).split("{")[0])
    folder = spec if spec.is_dir() else spec.parent
    path = folder / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; latent shards are written by fvdm cache-latents")
    return json.loads(path.read_text())


def latent_example(raw: dict[str, Any], rng: np.random.Generator, images: bool) -> dict[str, Any]:
    """A raw latent sample -> a training example: ``latents`` [N, C] drawn from the stored posterior and the
    first render (``keep_one_render`` has already picked one); MalformedSample when a field is bad."""
    key = raw.get("__key__", "?")
    if LATENT not in raw:
        raise MalformedSample(f"sample {key}: no {LATENT} (is this a latent shard?)")
    try:
        moments = npy_array(raw[LATENT])
    except ValueError as e:
        raise MalformedSample(f"sample {key}: {LATENT} unreadable: {e}") from e
    if moments.ndim != 3 or moments.shape[0] != 2:
        raise MalformedSample(f"sample {key}: {LATENT} has shape {moments.shape}, expected [2, N, C]")
    mean, std = moments.astype(np.float32)
    latents = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    if not np.isfinite(latents).all():
        raise MalformedSample(f"sample {key}: {LATENT} has non-finite values")
    example: dict[str, Any] = {"key": key, "latents": latents}
    if images:
        renders = decode_renders(raw)
        if not renders:
            raise MalformedSample(f"sample {key}: no render to condition on")
        example["image"] = renders[0]
    return example


@torch.no_grad()
def cache_latents(vae_path: str | Path, data: str, out: str | Path, batch_size: int = 16, num_surface: int = 20480,
                  num_sharp: int = 0, scale: str = "auto", scale_shapes: int = 256, device: Optional[str] = None,
                  shard_size: int = 256) -> dict[str, Any]:
    """Encode every shape of ``data`` with the VAE at ``vae_path`` into latent shards in ``out``.

    ``scale``: ``auto`` sets the scale factor to 1 / std of posterior draws of the first ``scale_shapes`` shapes
    (what the flow stage's own estimate uses), ``vae`` keeps the VAE's stored value, or a number. Returns (and writes) the ``latents.json`` index.
    """
    from fvdm.data.datamodule import expand_shards, subsample
    from fvdm.stages.checkpoints import load_pretrained_vae

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_pretrained_vae(vae_path).to(device).eval()
    if vae.cfg.pc_sharpedge_size:
        num_surface, num_sharp = vae.cfg.pc_size, vae.cfg.pc_sharpedge_size
    cfg = DataConfig(train=data, val=data, num_surface=num_surface, num_sharp=num_sharp, num_vol=1, num_near=1)
    urls = expand_shards(data, "--data")

    def batches():
        pending: list[tuple[dict, np.ndarray]] = []
        for url in urls:
            for raw in read_samples(url):
                sample = decode_sample(raw, with_renders=False)
                rng = np.random.default_rng([cfg.seed, zlib.crc32(sample.key.encode())])
                pending.append((raw, subsample(sample, cfg, rng)["surface"]))
                if len(pending) == batch_size:
                    yield pending
                    pending = []
        if pending:
            yield pending

    def encode(group):
        surface = torch.from_numpy(np.stack([s for _, s in group])).to(device)
        posterior = vae.encode_posterior(surface)
        return posterior.mean.cpu(), posterior.std.cpu()

    if scale == "auto":
        draws, seen = [], 0
        for group in batches():
            mean, std = encode(group)
            draws.append(mean + std * torch.randn_like(std))
            seen += len(group)
            if seen >= scale_shapes:
                break
        factor = 1.0 / float(torch.cat(draws).std())
    elif scale == "vae":
        factor = vae.scale_factor
    else:
        try:
            factor = float(scale)
        except ValueError:
            raise ValueError(f"--scale: '{scale}' is not auto, vae or a number") from None
    out = Path(out)
    count = 0
    with ShardWriter(out, prefix="latents", max_count=shard_size) as writer:
        for group in batches():
            mean, std = encode(group)
            for i, (raw, _) in enumerate(group):
                moments = torch.stack([mean[i], std[i]]).mul_(factor).numpy()  # [2, N, C]
                members = {k: bytes(v) for k, v in raw.items() if k.startswith("render_")}
                members[LATENT] = npy_bytes(moments)
                members["meta.json"] = json.dumps({"scale_factor": factor}).encode()
                writer.write_members(raw["__key__"], members)
                count += 1
    index = {"scale_factor": factor, "vae": str(vae_path), "vae_fingerprint": vae_fingerprint(vae),
             "shapes": count, "latent_shape": [vae.cfg.num_latents, vae.cfg.embed_dim], "source": data}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index

