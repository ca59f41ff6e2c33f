"""The embedded procedural data set: random CSG shapes with analytic SDFs, written as train/val shards.

Each shape composes 1-4 primitives (see :mod:`fvdm.data.sdf`) with unions, differences and intersections under
random rigid transforms, is normalized into the cube, meshed by marching cubes (for surface sampling, sharp
edges and renders), and its samples are taken from the analytic field: surface points are projected exactly
onto the zero level set, and the volume / near-surface SDF values are the analytic ones.
Shape ``i`` depends only on ``(seed, i)``, so the set is the same for any worker count and can be resumed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import trimesh
from skimage.measure import marching_cubes

from fvdm.data.progress import progress
from fvdm.data.render import render_views
from fvdm.data.sampling import SampleCounts, sdf_samples
from fvdm.data.sdf import (Box, Capsule, Cylinder, Difference, HalfSpace, Intersection, RoundBox, Shape, Shell,
                           Sphere, Torus, Transform, Union, evaluate, gradient)
from fvdm.data.shards import ShapeSample, ShardWriter, written_keys

GENERATOR_VERSION = 1  # bump when the same (seed, index) would give a different shape
MESH_RES = 128  # marching-cubes cells across the cube [-1, 1] (and across the raw shape's bbox when normalizing)
SHARP_ANGLE_DEG = 30.0  # mesh edges with a larger dihedral angle are sharp-edge candidates
PROJECT_TOL = 1e-7  # |sdf| after Newton projection onto the surface
PROJECT_STEPS = 8
PRIMITIVE_KINDS = ("box", "sphere", "cylinder", "torus", "capsule", "round_box", "plate", "shell")
PRIMITIVE_WEIGHTS = (0.15, 0.10, 0.14, 0.10, 0.12, 0.14, 0.12, 0.13)
NUM_PARTS, NUM_PARTS_WEIGHTS = (1, 2, 3, 4), (0.15, 0.30, 0.30, 0.25)
OPS, OPS_WEIGHTS = ("union", "difference", "intersection"), (0.5, 0.3, 0.2)
MIN_KEPT = 0.35  # a difference or intersection must keep this share of the shape's volume (and remove >= 3%)


# --------------------------------------------------------------------------------------------- random shapes


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """[3, 3] rotation: 40% one of the 24 axis-aligned ones (CAD-like), else uniform on SO(3)."""
    if rng.random() < 0.4:
        r = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], size=(3, 1))
        if np.linalg.det(r) < 0:
            r[0] *= -1
        return r
    w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def random_primitive(rng: np.random.Generator, size: float, sphere: bool = True) -> Shape:
    """One primitive at the origin with half-extent about ``size``; thin kinds have walls of ~0.07-0.14.

    ``sphere=False`` excludes the sphere (a lone sphere is the same shape every time after normalization).
    """
    weights = np.array(PRIMITIVE_WEIGHTS) * [k != "sphere" or sphere for k in PRIMITIVE_KINDS]
    kind = rng.choice(PRIMITIVE_KINDS, p=weights / weights.sum())
    u = rng.uniform
    if kind == "sphere":
        return Sphere(size * u(0.6, 1.0))
    if kind == "box":
        return Box(tuple(size * u(0.3, 1.0, 3)))
    if kind == "round_box":
        half = size * u(0.35, 1.0, 3)
        return RoundBox(tuple(half), u(0.1, 0.6) * half.min())
    if kind == "cylinder":
        return Cylinder(size * u(0.3, 1.0), size * u(0.2, 1.2))
    if kind == "capsule":
        return Capsule(size * u(0.3, 1.0), size * u(0.15, 0.5))
    if kind == "torus":
        major = size * u(0.55, 0.9)
        return Torus(major, major * u(0.15, 0.45))
    if kind == "plate":
        return Box((size * u(0.4, 1.0), size * u(0.4, 1.0), u(0.035, 0.07)))
    # shell: a thin wall around a closed primitive, usually cut open by a plane (bowl, cup, tray, tube)
    base_kind = rng.integers(3)
    base: Shape = (Sphere(size * u(0.6, 1.0)) if base_kind == 0 else
                   Cylinder(size * u(0.4, 1.0), size * u(0.4, 1.0)) if base_kind == 1 else
                   Box(tuple(size * u(0.4, 1.0, 3))))
    shell: Shape = Shell(base, u(0.07, 0.14))
    if rng.random() < 0.8:
        normal = rng.normal(size=3) if rng.random() < 0.5 else np.eye(3)[rng.integers(3)] * rng.choice([-1, 1])
        normal /= np.linalg.norm(normal)
        reach = float(np.abs(normal) @ base.bbox()[1])  # support of the base's bbox along the normal
        shell = Intersection((shell, HalfSpace(tuple(normal), u(-0.4, 0.6) * reach)))
    return shell


def project_to_surface(shape: Shape, points: np.ndarray, steps: int = PROJECT_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Newton steps p <- p - f(p) grad f / |grad f|^2 onto the zero level set; returns (points [P, 3], converged [P])."""
    p = np.array(points, dtype=np.float64)
    todo = np.arange(len(p))
    for _ in range(steps):
        f = evaluate(shape, p[todo])
        moving = np.abs(f) >= PROJECT_TOL
        todo, f = todo[moving], f[moving]
        if not len(todo):
            break
        g = gradient(shape, p[todo])  # [T, 3]
        p[todo] -= (f / np.maximum(np.sum(g * g, axis=1), 1e-12))[:, None] * g
    converged = np.abs(evaluate(shape, p)) < PROJECT_TOL
    return p, converged


def _add_part(rng: np.random.Generator, shape: Shape) -> Shape:
    """Union, cut or trim ``shape`` with a random transformed primitive placed at (or around) its surface."""
    lo, hi = shape.bbox()
    probes = rng.uniform(lo, hi, size=(2048, 3))
    inside = evaluate(shape, probes) < 0
    n_in = int(inside.sum())
    extent = float((hi - lo).max()) / 2
    for _ in range(8):
        op = rng.choice(OPS, p=OPS_WEIGHTS) if n_in >= 32 else "union"
        anchor = probes[inside][rng.integers(n_in)] if n_in else (lo + hi) / 2
        surf, ok = project_to_surface(shape, anchor[None])
        normal = gradient(shape, surf)[0]
        normal /= max(np.linalg.norm(normal), 1e-12)
        if op == "intersection":
            size = extent * rng.uniform(0.7, 1.2)
            center = probes[inside].mean(axis=0) + rng.normal(0.0, 0.2 * extent, 3)
        elif op == "difference":
            size = extent * rng.uniform(0.2, 0.6)
            center = surf[0] + normal * rng.uniform(-0.25, 0.35) * size
        else:
            size = extent * rng.uniform(0.25, 0.7)
            center = (surf[0] if ok[0] else anchor) + normal * rng.uniform(0.0, 0.6) * size
        part = Transform(random_primitive(rng, size), random_rotation(rng), tuple(center))
        if op == "union":
            return Union((shape, part))
        candidate = Difference(shape, part) if op == "difference" else Intersection((shape, part))
        kept = int((evaluate(candidate, probes) < 0).sum())
        if MIN_KEPT * n_in <= kept <= 0.97 * n_in:
            return candidate
    return shape


def random_shape(rng: np.random.Generator) -> Shape:
    """A random CSG tree of 1-4 transformed primitives; never empty (cuts that remove too much are redrawn)."""
    parts = rng.choice(NUM_PARTS, p=NUM_PARTS_WEIGHTS)
    shape: Shape = Transform(random_primitive(rng, rng.uniform(0.5, 0.9), sphere=parts > 1), random_rotation(rng))
    for _ in range(parts - 1):
        shape = _add_part(rng, shape)
    return shape


# ------------------------------------------------------------------------------- normalization and meshing


def grid_values(shape: Shape, lo: np.ndarray, step: float, dims: tuple[int, ...], stride: int = 4) -> np.ndarray:
    """SDF on the grid lo + step * (i, j, k) -> [nx, ny, nz], evaluated exactly only near the surface.

    Every SDF here is 1-Lipschitz, so a coarse grid (every ``stride`` points) bounds the rest: where
    |f(c)| - |x - c| > sqrt(3) step for the nearest coarse point c, x gets that same-signed lower bound. So all
    corners of every cell the surface crosses are exact and marching cubes gives the same mesh as a dense grid.
    """
    coarse_dims = [(d - 1 + stride - 1) // stride + 1 for d in dims]
    axes = [lo[a] + step * stride * np.arange(coarse_dims[a]) for a in range(3)]
    coarse = evaluate(shape, np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)).reshape(coarse_dims)
    nearest = [np.round(np.arange(d) / stride).astype(np.int64) for d in dims]  # per axis: nearest coarse index
    off = [(np.arange(d) - stride * n) * step for d, n in zip(dims, nearest)]  # per axis: offset to it
    c = coarse[np.ix_(*nearest)]  # [nx, ny, nz]
    bound = np.abs(c) - np.sqrt(off[0][:, None, None] ** 2 + off[1][None, :, None] ** 2 + off[2][None, None, :] ** 2)
    values = np.sign(c) * bound
    todo = np.nonzero(bound <= np.sqrt(3) * step * 1.01)
    values[todo] = evaluate(shape, lo + step * np.stack(todo, axis=1))
    return values


def mesh_field(shape: Shape, lo: np.ndarray, hi: np.ndarray, res: int = MESH_RES) -> trimesh.Trimesh:
    """Marching-cubes mesh of the zero level set inside [lo, hi] with ``res`` cells along the longest side.

    Raises ValueError when the field has no surface there or the shape is clipped by the box.
    """
    step = float((hi - lo).max()) / res
    dims = tuple(int(np.ceil((hi[a] - lo[a]) / step - 1e-9)) + 1 for a in range(3))
    values = grid_values(shape, lo, step, dims)
    border = np.concatenate([values[[0, -1]].ravel(), values[:, [0, -1]].ravel(), values[:, :, [0, -1]].ravel()])
    if values.min() >= 0 or border.min() <= 0:
        raise ValueError("shape is empty on the grid or crosses its border")
    verts, faces, _, _ = marching_cubes(values, 0.0, spacing=(step,) * 3, allow_degenerate=False)
    # scikit-image winds faces counter-clockwise seen from larger values: outward for negative-inside SDFs
    return trimesh.Trimesh(verts + lo, faces, process=True)


def normalize(shape: Shape, margin: float) -> tuple[Shape, np.ndarray, float]:
    """(normalized shape, center [3], scale): the marching-cubes bbox maps into [-(1 - margin), 1 - margin]^3.

    sdf_norm(p) = scale * sdf(p / scale + center), i.e. a Transform by scale and translation -scale * center.
    """
    lo, hi = shape.bbox()
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("shape is unbounded (a half-space outside an intersection or difference)")
    pad = 2.0 * float((hi - lo).max()) / MESH_RES
    verts = mesh_field(shape, lo - pad, hi + pad).vertices
    vlo, vhi = verts.min(axis=0), verts.max(axis=0)
    center = (vlo + vhi) / 2
    scale = (1.0 - margin) / (float((vhi - vlo).max()) / 2)
    return Transform(shape, translation=tuple(-scale * center), scale=scale), center, scale


# ------------------------------------------------------------------------------------------------- sampling


def _with_normals(shape: Shape, points: np.ndarray, count: int) -> np.ndarray:
    """Project candidate points onto the surface, keep ``count`` converged ones, append unit normals -> [count, 6]."""
    p, ok = project_to_surface(shape, points)
    p = p[ok][:count]
    if len(p) < count:
        raise ValueError(f"only {len(p)} of {count} surface points converged onto the zero level set")
    return np.concatenate([p, _unit(gradient(shape, p))], axis=1)


def surface_samples(shape: Shape, mesh: trimesh.Trimesh, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count, 6] points sampled on the mesh, projected exactly onto the zero level set, with SDF-gradient normals."""
    if count == 0:
        return np.zeros((0, 6))
    pts, _ = trimesh.sample.sample_surface(mesh, int(count * 1.05) + 16, seed=rng)
    return _with_normals(shape, pts, count)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def crease_mask(shape: Shape, a: np.ndarray, b: np.ndarray, step: float) -> np.ndarray:
    """[E] bool: does the analytic surface really bend by > SHARP_ANGLE_DEG across mesh edge (a, b) ([E, 3] each)?

    Marching cubes also makes a few sharp dihedral angles on smooth surfaces; at a true crease the SDF gradients
    one ``step`` to either side of the projected edge midpoint (across the edge, in the tangent plane) differ.
    """
    q, _ = project_to_surface(shape, (a + b) / 2)
    across = _unit(np.cross(b - a, gradient(shape, q)))  # [E, 3]
    g1, g2 = _unit(gradient(shape, q + step * across)), _unit(gradient(shape, q - step * across))
    return np.sum(g1 * g2, axis=1) < np.cos(np.radians(SHARP_ANGLE_DEG))


def sharp_samples(shape: Shape, mesh: trimesh.Trimesh, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count, 6] points on mesh edges sharper than SHARP_ANGLE_DEG, projected like the surface; [0, 6] if none."""
    candidate = mesh.face_adjacency_angles > np.radians(SHARP_ANGLE_DEG)
    if count == 0 or not candidate.any():
        return np.zeros((0, 6))
    a, b = (mesh.vertices[e] for e in mesh.face_adjacency_edges[candidate].T)  # [E, 3] each
    sharp = crease_mask(shape, a, b, 2.0 / MESH_RES)
    if not sharp.any():
        return np.zeros((0, 6))
    a, b = a[sharp], b[sharp]
    length = np.linalg.norm(b - a, axis=1)
    n = int(count * 1.05) + 16
    edge = rng.choice(len(a), size=n, p=length / length.sum())
    t = rng.uniform(0.0, 1.0, (n, 1))
    return _with_normals(shape, a[edge] + t * (b[edge] - a[edge]), count)


@dataclass
class SynthShape:
    """One generated shape: its raw CSG tree, the normalized one, the normalization and the mesh."""

    raw: Shape
    shape: Shape
    center: np.ndarray
    scale: float
    mesh: trimesh.Trimesh


def synth_shape(rng: np.random.Generator, margin: float) -> SynthShape:
    """A random normalized shape with its marching-cubes mesh (redrawn in the rare case meshing fails)."""
    err: Exception | None = None
    for _ in range(10):
        raw = random_shape(rng)
        try:
            shape, center, scale = normalize(raw, margin)
            mesh = mesh_field(shape, np.full(3, -1.0), np.full(3, 1.0))
        except ValueError as e:
            err = e
            continue
        return SynthShape(raw, shape, center, scale, mesh)
    raise RuntimeError(f"could not mesh a random shape in 10 draws: {err}")


def shape_key(index: int) -> str:
    return f"synth-{index:06d}"


def make_sample(index: int, seed: int, counts: SampleCounts) -> ShapeSample:
    """The complete shard sample of shape ``index`` of the set with ``seed`` (a function of both only)."""
    rng = np.random.default_rng([seed, index])
    s = synth_shape(rng, counts.margin)
    surface = surface_samples(s.shape, s.mesh, counts.surface, rng)
    sharp = sharp_samples(s.shape, s.mesh, counts.sharp, rng)
    vol, near = sdf_samples(surface, sharp, lambda p: evaluate(s.shape, p), counts, rng)
    render_seed = int(rng.integers(2**31))
    renders = render_views(s.mesh.vertices, s.mesh.faces, counts.renders, counts.render_size, render_seed) \
        if counts.renders else []
    tree = s.raw.to_dict()
    meta = {
        "source": "synth",
        "generator": {"name": "fvdm.data.synth", "version": GENERATOR_VERSION, "shape": tree},
        "seed": seed,
        "index": index,
        "content_hash": hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest(),
        "normalization": {"center": s.center.tolist(), "scale": s.scale},
        "watertight": bool(s.mesh.is_watertight),
        "mesh": {"vertices": len(s.mesh.vertices), "faces": len(s.mesh.faces), "resolution": MESH_RES},
        "counts": {"surface": len(surface), "sharp": len(sharp), "vol": len(vol), "near": len(near),
                   "renders": len(renders), "render_size": counts.render_size, "margin": counts.margin},
    }
    return ShapeSample(shape_key(index), surface.astype(np.float32), sharp.astype(np.float32), vol, near,
                       renders, meta)


# ------------------------------------------------------------------------------------------------------- run


@dataclass
class SynthSummary:
    """What a run_synth call did."""

    written: int
    skipped: int
    train: int
    val: int
    seconds: float


def _job(args: tuple[int, int, SampleCounts]) -> ShapeSample:
    return make_sample(*args)


def split_sizes(num: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) counts: val is round(num * val_fraction), at least 1 when num >= 2 and val_fraction > 0."""
    n_val = round(num * val_fraction)
    if val_fraction > 0 and num >= 2:
        n_val = min(max(n_val, 1), num - 1)
    return num - n_val, n_val


def _check_settings(out: Path, settings: dict) -> None:
    """Write out/synth.json, or check that a resumed run uses the same settings (else the sets would mix)."""
    path = out / "synth.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"{path}: this directory was generated with different settings ({', '.join(diff)}); "
                             "rerun with the same ones to resume, or use a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1, sort_keys=True))


def run_synth(out: str | Path, num: int, seed: int = 0, val_fraction: float = 0.1,
              counts: SampleCounts = SampleCounts(), workers: int = 1, shard_size: int = 64) -> SynthSummary:
    """Generate ``num`` shapes into ``out/train`` and ``out/val`` shards (the last indices are validation).

    Deterministic from ``seed`` for any ``workers``; resumable: keys already in complete shards are skipped.
    """
    if num < 1 or workers < 1 or shard_size < 1:
        raise ValueError(f"synth: num, workers and shard_size must be >= 1 (got {num}, {workers}, {shard_size})")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"synth: val_fraction must be in [0, 1), got {val_fraction}")
    if min(counts.surface, counts.vol, counts.near) < 1 or min(counts.sharp, counts.renders) < 0:
        raise ValueError(f"synth: counts need surface, vol, near >= 1 and sharp, renders >= 0, got {counts}")
    if not 0.0 <= counts.margin < 1.0:
        raise ValueError(f"synth: margin must be in [0, 1), got {counts.margin}")
    out = Path(out)
    n_train, n_val = split_sizes(num, val_fraction)
    settings = {"num": num, "seed": seed, "val_fraction": val_fraction, "counts": asdict(counts),
                "generator_version": GENERATOR_VERSION}
    _check_settings(out, json.loads(json.dumps(settings)))  # as JSON reads it back (tuples become lists)
    splits = {"train": range(n_train), "val": range(n_train, num)}
    done = {name: written_keys(out / name) for name in splits}
    jobs = [(i, seed, counts) for name, idx in splits.items() for i in idx if shape_key(i) not in done[name]]
    t0 = time.perf_counter()
    writers = {name: ShardWriter(out / name, max_count=shard_size) for name in splits}
    try:
        with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
            samples = pool.imap(_job, jobs) if pool else map(_job, jobs)  # in index order either way
            for sample in progress(samples, len(jobs), "synth", "shape"):
                writers["val" if sample.meta["index"] >= n_train else "train"].write(sample)
    finally:
        for w in writers.values():
            w.close()
    summary = SynthSummary(len(jobs), num - len(jobs), n_train, n_val, time.perf_counter() - t0)
    print(f"synth: wrote {summary.written} shapes ({summary.skipped} already done) in {summary.seconds:.1f} s; "
          f"{n_train} train in {out / 'train'}, {n_val} val in {out / 'val'}")
    return summary
