"""The shard sample schema, its encoding, and an atomic, resumable shard writer.

One WebDataset sample per shape (see ``data/README.md``). The SDF sign convention is stated once here and
used everywhere in fvdm: **negative inside**, positive outside, in the normalized cube [-1, 1]^3.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

SDF_SIGN = -1.0  # sign of the SDF inside a shape: negative inside, positive outside
FIELDS = ("surface", "sharp", "vol", "near")
WIDTHS = {"surface": 6, "sharp": 6, "vol": 4, "near": 4}  # xyz+normal, xyz+normal, xyz+sdf, xyz+sdf


class MalformedSample(ValueError):
    """A sample whose fields are missing, of the wrong shape, or not finite."""


@dataclass
class ShapeSample:
    """Everything stored for one shape."""

    key: str
    surface: np.ndarray  # [Ns, 6] surface points with unit normals
    sharp: np.ndarray  # [Ne, 6] sharp-edge points with normals, may be empty
    vol: np.ndarray  # [Nv, 4] uniform volume points in [-1, 1]^3 with SDF
    near: np.ndarray  # [Nn, 4] near-surface points with SDF
    renders: list[np.ndarray] = field(default_factory=list)  # K x [H, W, 3] uint8, white background
    meta: dict[str, Any] = field(default_factory=dict)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def encode_sample(s: ShapeSample) -> dict[str, bytes]:
    """ShapeSample -> WebDataset member dict (``__key__`` plus one file per field)."""
    out: dict[str, Any] = {"__key__": s.key}
    for name in FIELDS:
        out[f"{name}.npy"] = _npy(getattr(s, name))
    for i, img in enumerate(s.renders):
        out[f"render_{i:02d}.png"] = _png(img)
    out["meta.json"] = json.dumps(s.meta, sort_keys=True).encode()
    return out


def decode_sample(d: dict[str, Any], with_renders: bool = True) -> ShapeSample:
    """Raw WebDataset dict (bytes values) -> validated ShapeSample; raises MalformedSample."""
    key = d.get("__key__", "?")
    arrays = {}
    for name in FIELDS:
        raw = d.get(f"{name}.npy")
        if raw is None:
            raise MalformedSample(f"sample {key}: field '{name}' missing")
        try:
            a = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as e:
            raise MalformedSample(f"sample {key}: field '{name}' unreadable: {e}") from e
        if a.ndim != 2 or a.shape[1] != WIDTHS[name]:
            raise MalformedSample(f"sample {key}: field '{name}' has shape {a.shape}, expected [N, {WIDTHS[name]}]")
        if not np.isfinite(a).all():
            raise MalformedSample(f"sample {key}: field '{name}' has non-finite values")
        arrays[name] = a.astype(np.float32, copy=False)
    for name in ("surface", "vol", "near"):
        if len(arrays[name]) == 0:
            raise MalformedSample(f"sample {key}: field '{name}' is empty")
    try:
        meta = json.loads(d["meta.json"]) if "meta.json" in d else {}
    except Exception as e:
        raise MalformedSample(f"sample {key}: meta.json unreadable: {e}") from e
    renders = []
    if with_renders:
        for k in sorted(k for k in d if k.startswith("render_") and k.endswith(".png")):
            try:
                renders.append(np.asarray(Image.open(io.BytesIO(d[k])).convert("RGB")))
            except Exception as e:
                raise MalformedSample(f"sample {key}: {k} unreadable: {e}") from e
    return ShapeSample(key=key, renders=renders, meta=meta, **arrays)


class ShardWriter:
    """Writes ``{prefix}-{index:06d}.tar`` shards atomically with a ``.json`` sidecar listing their keys.

    A shard appears under its final name only once complete, so a killed run leaves no truncated shard;
    :func:`written_keys` lists what is done so that a rerun skips it and continues at the next index.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_count: int = 64, max_bytes: int = 1 << 30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_count, self.max_bytes = prefix, max_count, max_bytes
        existing = sorted(self.out_dir.glob(f"{prefix}-*.tar"))
        self.index = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in existing), default=-1)
        self._tar: tarfile.TarFile | None = None
        self._keys: list[str] = []
        self._bytes = 0
        self.shards: list[Path] = []

    def _path(self) -> Path:
        return self.out_dir / f"{self.prefix}-{self.index:06d}.tar"

    def write(self, sample: ShapeSample) -> None:
        members = encode_sample(sample)
        size = sum(len(v) for k, v in members.items() if k != "__key__")
        if self._tar is not None and (len(self._keys) >= self.max_count or self._bytes + size > self.max_bytes):
            self._close_shard()
        if self._tar is None:
            self._tar = tarfile.open(str(self._path()) + ".tmp", "w")
        for name, data in members.items():
            if name == "__key__":
                continue
            info = tarfile.TarInfo(f"{sample.key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.append(sample.key)
        self._bytes += size

    def _close_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        final = self._path()
        final.with_suffix(".json").write_text(json.dumps({"keys": self._keys}))
        os.replace(str(final) + ".tmp", final)
        self.shards.append(final)
        self._tar, self._keys, self._bytes = None, [], 0
        self.index += 1

    def close(self) -> None:
        if self._tar is not None:
            self._close_shard()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def written_keys(out_dir: str | Path, prefix: str = "shard") -> set[str]:
    """Keys of every complete shard in ``out_dir`` (read from the sidecars)."""
    keys: set[str] = set()
    for side in Path(out_dir).glob(f"{prefix}-*.json"):
        if side.with_suffix(".tar").exists():
            keys.update(json.loads(side.read_text())["keys"])
    return keys


def shard_pattern(out_dir: str | Path, prefix: str = "shard") -> str:
    """A brace pattern covering every complete shard in ``out_dir`` (what DataConfig.train expects)."""
    shards = sorted(Path(out_dir).glob(f"{prefix}-*.tar"))
    if not shards:
        raise FileNotFoundError(f"{out_dir}: no {prefix}-*.tar shards")
    if len(shards) == 1:
        return str(shards[0])
    return str(Path(out_dir) / f"{prefix}-{{{','.join(p.stem.rsplit('-', 1)[1] for p in shards)}}}.tar")


def iter_tar(path: str | Path) -> Iterable[dict[str, bytes]]:
    """Group a shard's members into raw sample dicts (for tools; training reads through webdataset)."""
    current: dict[str, Any] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current.setdefault("__key__", key)
            f = tar.extractfile(m)
            current[ext] = f.read() if f else b""
    if current:
        yield current
