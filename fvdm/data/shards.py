"""The shard sample schema, its encoding, and an atomic, resumable shard writer.

One WebDataset sample per shape (see ``data/README.md``). The SDF sign convention is stated once here and
used everywhere in fvdm: **negative inside**, positive outside, in the normalized cube [-1, 1]^3.
"""
from __future__ import annotations

import functools
import io
import json
import math
import mmap
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext

SDF_SIGN = -1.0  # sign of the SDF inside a shape: negative inside, positive outside
FIELDS = ("surface", "sharp", "vol", "near")
WIDTHS = {"surface": 6, "sharp": 6, "vol": 4, "near": 4}  # xyz+normal, xyz+normal, xyz+sdf, xyz+sdf


class MalformedSample(ValueError):
    """A sample whose fields are missing, of the wrong shape, or not finite."""


class ShardError(ValueError):
    """A local shard that cannot be read on: empty, not a tar, truncated or with a corrupt header."""


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


def npy_bytes(a: np.ndarray) -> bytes:
    """``a`` as float32 ``.npy`` bytes (never pickled)."""
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
        out[f"{name}.npy"] = npy_bytes(getattr(s, name))
    for i, img in enumerate(s.renders):
        out[f"render_{i:02d}.png"] = _png(img)
    out["meta.json"] = json.dumps(s.meta, sort_keys=True).encode()
    return out


@functools.lru_cache(maxsize=256)
def npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a ``.npy`` magic + header (cached: shards repeat a few shapes)."""
    head = io.BytesIO(prefix)
    version = np.lib.format.read_magic(head)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy version {version}")
    return read(head)


def npy_array(buf: bytes | memoryview) -> np.ndarray:
    """The array stored in ``.npy`` bytes, as a read-only view of ``buf`` (no copy, unlike ``np.load``).

    Raises ValueError on a bad magic or header, an object dtype (fvdm never pickles) or a short payload.
    """
    start = 10 if bytes(buf[6:7]) == b"\x01" else 12  # header length: uint16 in version 1, uint32 after
    offset = start + int.from_bytes(buf[8:start], "little")
    shape, fortran, dtype = npy_header(bytes(buf[:offset]))
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    count = math.prod(shape)
    if len(buf) < offset + count * dtype.itemsize:
        raise ValueError(f"payload of {len(buf) - offset} bytes is too short for {shape} {dtype}")
    flat = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def decode_sample(d: dict[str, Any], with_renders: bool = True, check_finite: bool = True) -> ShapeSample:
    """Raw WebDataset dict (bytes or memoryview values) -> validated ShapeSample; raises MalformedSample.

    The arrays are read-only views of the raw buffers. ``check_finite=False`` skips the scan of every value
    for NaN/inf; streaming then checks only the rows it draws (see ``fvdm.data.datamodule.take``).
    """
    key = d.get("__key__", "?")
    arrays = {}
    for name in FIELDS:
        raw = d.get(f"{name}.npy")
        if raw is None:
            raise MalformedSample(f"sample {key}: field '{name}' missing")
        try:
            a = npy_array(raw)
        except Exception as e:
            raise MalformedSample(f"sample {key}: field '{name}' unreadable: {e}") from e
        if a.ndim != 2 or a.shape[1] != WIDTHS[name]:
            raise MalformedSample(f"sample {key}: field '{name}' has shape {a.shape}, expected [N, {WIDTHS[name]}]")
        if check_finite and not np.isfinite(a).all():
            raise MalformedSample(f"sample {key}: field '{name}' has non-finite values")
        arrays[name] = a.astype(np.float32, copy=False)
    for name in ("surface", "vol", "near"):
        if len(arrays[name]) == 0:
            raise MalformedSample(f"sample {key}: field '{name}' is empty")
    try:
        meta = json.loads(bytes(d["meta.json"])) if "meta.json" in d else {}
    except Exception as e:
        raise MalformedSample(f"sample {key}: meta.json unreadable: {e}") from e
    renders = decode_renders(d) if with_renders else []
    return ShapeSample(key=key, renders=renders, meta=meta, **arrays)


def decode_renders(d: dict[str, Any]) -> list[np.ndarray]:
    """The ``render_XX.png`` members of a raw sample as [H, W, 3] uint8 arrays; raises MalformedSample."""
    renders = []
    for k in sorted(k for k in d if k.startswith("render_") and k.endswith(".png")):
        try:
            img = Image.open(io.BytesIO(d[k]))
            renders.append(np.asarray(img if img.mode == "RGB" else img.convert("RGB")))
        except Exception as e:
            raise MalformedSample(f"sample {d.get('__key__', '?')}: {k} unreadable: {e}") from e
    return renders


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
        del members["__key__"]
        self.write_members(sample.key, members)

    def write_members(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample given as {member name without the key: bytes}."""
        size = sum(len(v) for v in members.values())
        if self._tar is not None and (len(self._keys) >= self.max_count or self._bytes + size > self.max_bytes):
            self._close_shard()
        if self._tar is None:
            self._tar = tarfile.open(str(self._path()) + ".tmp", "w")
        for name, data in members.items():
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.append(key)
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
    """Group a shard's members into raw sample dicts of bytes (for tools; streaming uses :func:`read_samples`)."""
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


def tar_members(path: str | Path) -> Iterator[tuple[str, memoryview]]:
    """(name, data) of each regular member of a local tar; ``data`` is a zero-copy view of the mapped file.

    Only the 512-byte headers are parsed (by ``tarfile``); member data is never copied or read here, so a
    reader touches only the pages it uses. Raises :class:`ShardError` (after the members before the damage)
    when the file is empty or not a tar, a member runs past the end of the file (truncated), or a header is
    cut or corrupt instead of the end-of-archive block. The file must not be truncated in place while its
    views are alive (reading a lost page is a SIGBUS); ShardWriter replaces files atomically.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ShardError(f"{path}: empty file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # lives as long as views of it do
    view = memoryview(mm)
    try:
        tar = tarfile.open(fileobj=mm, mode="r:")
        for m in tar:
            if m.offset_data + m.size > size:
                raise ShardError(f"{path}: member {m.name} ends at byte {m.offset_data + m.size} of a "
                                 f"{size}-byte file (truncated)")
            if m.isreg():
                yield m.name, view[m.offset_data:m.offset_data + m.size]
    except tarfile.TarError as e:
        raise ShardError(f"{path}: {e}") from e
    end = mm[tar.offset:tar.offset + tarfile.BLOCKSIZE]  # tarfile stops silently at a bad header: check
    if end != bytes(tarfile.BLOCKSIZE):
        what = "a cut or corrupt header" if end else "the end of the file"
        raise ShardError(f"{path}: {what} at byte {tar.offset} instead of the end-of-archive block (truncated?)")


def read_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw sample dicts of a local shard, grouped as webdataset does, with zero-copy memoryview values.

    Members are grouped by key (the name up to the first dot of its basename; lower-case extension), and
    each dict carries ``__key__`` and ``__url__`` (= ``path``). A sample cut by damage is still yielded, so
    that its missing fields are reported when decoded, before the :class:`ShardError` is raised.
    """
    current: dict[str, Any] = {}
    try:
        for name, data in tar_members(path):
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if current.get("__key__") != key:
                if current:
                    yield current
                current = {"__key__": key, "__url__": str(path)}
            current.setdefault(ext.lower(), data)  # a duplicate name keeps the first, as webdataset does
    except ShardError:
        if current:
            yield current
        raise
    if current:
        yield current
