"""The procedural shape set: analytic SDFs checked against libigl on the meshes, determinism, shards, variety."""
from __future__ import annotations

import json
import time

import igl
import numpy as np
import pytest

from fvdm.data.progress import progress
from fvdm.data.sampling import SampleCounts
from fvdm.data.sdf import (Box, Capsule, Cylinder, Difference, HalfSpace, Intersection, RoundBox, Shape, Shell,
                           Sphere, Torus, Transform, Union, evaluate, gradient, shape_from_dict)
from fvdm.data.shards import decode_sample, iter_tar, written_keys
from fvdm.data.synth import (grid_values, make_sample, mesh_field, normalize, random_rotation, random_shape,
                             run_synth, sharp_samples, split_sizes)

TINY = SampleCounts(surface=512, sharp=128, vol=512, near=512, renders=2, render_size=64)
FINE_RES = 160


def _all_primitives() -> Shape:
    """A union of every primitive kind under rotations, translations and scales (exact outside)."""
    rng = np.random.default_rng(1)
    prims = [Sphere(0.3), Box((0.3, 0.2, 0.1)), RoundBox((0.3, 0.25, 0.2), 0.08), Cylinder(0.2, 0.3),
             Capsule(0.25, 0.12), Torus(0.3, 0.08), Box((0.35, 0.3, 0.04))]
    centers = [(-0.9, 0, 0), (0, -0.9, 0), (0, 0, -0.9), (0.9, 0, 0), (0, 0.9, 0), (0, 0, 0.9), (0, 0, 0)]
    return Union(tuple(Transform(p, random_rotation(rng), c, float(rng.uniform(0.7, 1.3)))
                       for p, c in zip(prims, centers)))


def _cut_shell() -> Shape:
    """A bowl: a thin spherical wall cut by a plane (exact inside, a bound outside)."""
    return Intersection((Shell(Sphere(0.6), 0.1), HalfSpace((0.2, 1.0, 0.1), 0.2)))


def _mesh_signed_distance(mesh, points: np.ndarray) -> np.ndarray:
    """Independent SDF: exact unsigned distance to the mesh, sign from the fast winding number (negative inside)."""
    v, f = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
    d, _, _, _ = igl.signed_distance(points, v, f, sign_type=igl.SIGNED_DISTANCE_TYPE_UNSIGNED)
    inside = igl.fast_winding_number(v, f, points) > 0.5
    return np.where(inside, -np.abs(d), np.abs(d))


def _random_with(op: str) -> Shape:
    """The first random shape (seeds [5, i]) whose tree uses ``op``, so that every CSG node is checked."""
    for i in range(100):
        shape = random_shape(np.random.default_rng([5, i]))
        if f'"{op}"' in json.dumps(shape.to_dict()):
            return shape
    raise AssertionError(f"no random shape with a {op}")


@pytest.mark.parametrize("make", [_all_primitives, _cut_shell, *[lambda op=op: _random_with(op)
                                                                  for op in ("union", "difference", "intersection")]],
                         ids=["primitives", "cut_shell", "random_union", "random_difference", "random_intersection"])
def test_analytic_sdf_matches_mesh_distance(make):
    shape, _, _ = normalize(make(), margin=0.05)
    mesh = mesh_field(shape, np.full(3, -1.0), np.full(3, 1.0), res=FINE_RES)
    assert mesh.is_watertight
    voxel = 2.0 / FINE_RES
    rng = np.random.default_rng(0)
    surf = mesh.sample(1500, seed=rng) + rng.normal(0.0, 0.05, (1500, 3))
    p = np.concatenate([rng.uniform(-1, 1, (3000, 3)), surf])
    analytic, reference = evaluate(shape, p), _mesh_signed_distance(mesh, p)

    far = np.abs(reference) > 3 * voxel
    assert far.sum() > 1000
    assert np.mean(np.sign(analytic[far]) == np.sign(reference[far])) >= 0.999

    inside = analytic < 0
    exact = np.where(inside, shape.exact_inside, shape.exact_outside)
    err = np.abs(analytic - reference)
    if exact.any():
        assert np.quantile(err[exact], 0.99) < voxel and err[exact].max() < 2 * voxel
    # where the magnitude is only a bound it must not exceed the true distance
    assert np.all(np.abs(analytic[~exact]) <= np.abs(reference[~exact]) + voxel)
    if make is _all_primitives:
        assert exact[~inside].all() and exact[~inside].sum() > 1000
    if make is _cut_shell:
        assert exact[inside].all() and not exact[~inside].any()


@pytest.mark.parametrize("shape,volume", [
    (Transform(Torus(0.6, 0.2), random_rotation(np.random.default_rng(0)), (0.1, 0.0, 0.0)), 2 * np.pi**2 * 0.6 * 0.04),
    (Cylinder(0.5, 0.4), np.pi * 0.25 * 0.8),
    (Capsule(0.4, 0.3), np.pi * 0.09 * 0.8 + 4 / 3 * np.pi * 0.027),
    (RoundBox((0.6, 0.5, 0.4), 0.1), 8 * 0.5 * 0.4 * 0.3 + 2 * 0.1 * (4 * (0.5 * 0.4 + 0.5 * 0.3 + 0.4 * 0.3))
     + np.pi * 0.01 * 2 * (0.5 + 0.4 + 0.3) + 4 / 3 * np.pi * 0.001),
    (Shell(Sphere(0.7), 0.1), 4 / 3 * np.pi * (0.75**3 - 0.65**3)),
    (Intersection((Box((0.5, 0.5, 0.5)), HalfSpace((0.0, 0.0, 1.0), 0.2))), 1.0 * 0.7),
    (Union((Transform(Sphere(0.4), translation=(-0.5, 0, 0)), Transform(Sphere(0.3), translation=(0.5, 0, 0)))),
     4 / 3 * np.pi * (0.064 + 0.027)),
    (Difference(Box((0.5, 0.5, 0.5)), Transform(Sphere(0.3), translation=(0.5, 0.5, 0.5))),
     1.0 - np.pi / 6 * 0.027),
    (Intersection((Box((0.5, 0.5, 0.5)), Transform(Box((0.5, 0.5, 0.5)), translation=(0.3, 0.2, 0.1)))),
     0.7 * 0.8 * 0.9),
], ids=["torus", "cylinder", "capsule", "round_box", "shell", "half_space", "union", "difference", "intersection"])
def test_primitive_and_csg_volumes(shape, volume):
    """Each node describes the intended solid: mesh volume vs the closed-form volume."""
    mesh = mesh_field(shape, np.full(3, -1.2), np.full(3, 1.2))
    assert mesh.volume == pytest.approx(volume, rel=0.01)


def test_exactness_flags_and_json_round_trip():
    a, b = Transform(Box((0.5, 0.4, 0.3)), random_rotation(np.random.default_rng(0)), (0.1, 0, 0), 1.5), Sphere(0.4)
    assert (Union((a, b)).exact_inside, Union((a, b)).exact_outside) == (False, True)
    assert (Intersection((a, b)).exact_inside, Intersection((a, b)).exact_outside) == (True, False)
    assert (Difference(a, b).exact_inside, Difference(a, b).exact_outside) == (True, False)
    with pytest.raises(ValueError, match="exact on both sides"):
        Shell(Union((a, b)), 0.1)
    with pytest.raises(ValueError, match="unknown"):
        shape_from_dict({"type": "blob"})
    with pytest.raises(ValueError, match="radius"):
        Sphere(-1.0)
    assert Box((1, 2, 3))(np.array([[2.0, 3.0, 4.0]]))[0] == pytest.approx(np.sqrt(3))
    shape = random_shape(np.random.default_rng(3))
    again = shape_from_dict(json.loads(json.dumps(shape.to_dict())))
    p = np.random.default_rng(1).uniform(-1.5, 1.5, (1000, 3))
    assert again == shape and np.array_equal(evaluate(again, p), evaluate(shape, p))


def _normalized_from_meta(meta: dict) -> Shape:
    """The normalized SDF rebuilt from meta.json alone: sdf_norm(p) = scale * sdf(p / scale + center)."""
    raw = shape_from_dict(meta["generator"]["shape"])
    c, s = np.asarray(meta["normalization"]["center"]), meta["normalization"]["scale"]
    return Transform(raw, translation=tuple(-s * c), scale=s)


def test_samples_lie_on_the_surface_and_match_meta():
    counts = SampleCounts(surface=2000, sharp=500, vol=2000, near=2000, renders=0)
    sample = None
    for index in range(10):  # find a shape with sharp edges, so that both surface kinds are checked
        sample = make_sample(index, 11, counts)
        if len(sample.sharp):
            break
    assert sample is not None and sample.sharp.shape == (500, 6)
    shape = _normalized_from_meta(sample.meta)
    for pts in (sample.surface, sample.sharp):
        p, n = pts[:, :3].astype(np.float64), pts[:, 3:].astype(np.float64)
        assert np.abs(evaluate(shape, p)).max() < 1e-4
        assert np.abs(np.linalg.norm(n, axis=1) - 1).max() < 1e-4
        outward = np.mean((evaluate(shape, p + 2e-3 * n) > 0) & (evaluate(shape, p - 2e-3 * n) < 0))
        assert outward > 0.99
    assert np.abs(sample.surface[:, :3]).max() == pytest.approx(0.95, abs=2e-3)  # bbox touches 1 - margin
    for field in (sample.vol, sample.near):
        assert np.abs(field[:, :3]).max() <= 1.0
        np.testing.assert_allclose(field[:, 3], evaluate(shape, field[:, :3].astype(np.float64)), atol=1e-6)
    assert sample.meta["watertight"] is True and sample.meta["counts"]["sharp"] == 500
    assert np.mean(sample.vol[:, 3] < 0) > 0.005  # uniform samples hit the inside


def test_sharp_edges_found_on_a_box_not_on_a_sphere():
    rng = np.random.default_rng(0)
    for shape, expect_sharp in ((Transform(Box((0.6, 0.5, 0.4)), random_rotation(rng)), True),
                                (Transform(Torus(0.7, 0.2), random_rotation(rng)), False), (Sphere(0.8), False)):
        mesh = mesh_field(shape, np.full(3, -1.0), np.full(3, 1.0))
        sharp = sharp_samples(shape, mesh, 300, rng)
        assert (len(sharp) == 300) == expect_sharp
        if expect_sharp:  # on a box edge two of the three |local coordinates| are at the half extents
            local = np.abs(sharp[:, :3] @ np.asarray(shape.rotation)) - (0.6, 0.5, 0.4)
            assert np.mean(np.sum(np.abs(local) < 0.02, axis=1) >= 2) > 0.9


def test_deterministic_from_seed():
    a, b = make_sample(3, 7, TINY), make_sample(3, 7, TINY)
    for name in ("surface", "sharp", "vol", "near"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert all(np.array_equal(x, y) for x, y in zip(a.renders, b.renders)) and a.meta == b.meta
    other = make_sample(3, 8, TINY)
    assert other.meta["content_hash"] != a.meta["content_hash"]
    assert not np.array_equal(other.vol[:, 3], a.vol[:, 3])


def test_variety():
    rng_points = np.random.default_rng(0).uniform(-1, 1, (20000, 3))
    descriptors, kinds, trees = [], set(), set()
    for i in range(20):
        raw = random_shape(np.random.default_rng([0, i]))
        lo, hi = raw.bbox()
        center, half = (lo + hi) / 2, (hi - lo).max() / 2
        p = center + half * rng_points
        inside = p[evaluate(raw, p) < 0]
        extent = np.sort(inside.max(axis=0) - inside.min(axis=0))
        fill = len(inside) / len(p) * (2 * half) ** 3 / np.prod(extent)  # volume / its bbox volume
        descriptors.append((extent[0] / extent[2], extent[1] / extent[2], fill))
        tree = json.dumps(raw.to_dict(), sort_keys=True)
        trees.add(tree)
        kinds.update(t for t in ("box", "sphere", "cylinder", "torus", "capsule", "round_box", "shell",
                                 "union", "difference", "intersection") if f'"{t}"' in tree)
    d = np.array(descriptors)
    assert len(trees) == 20 and len(kinds) >= 9
    assert d[:, 2].std() > 0.1 and d[:, 0].std() > 0.1
    close = np.all(np.abs(d[:, None] - d[None]) < 0.03, axis=-1)  # pairs with near-identical proportions
    assert close.sum() - 20 <= 4


def test_run_synth_writes_resumable_train_and_val_shards(tmp_path, capsys):
    out = tmp_path / "synth"
    summary = run_synth(out, num=4, seed=2, counts=TINY, workers=2, shard_size=2)
    assert (summary.written, summary.train, summary.val) == (4, 3, 1)
    assert "synth: wrote 4 shapes" in capsys.readouterr().out
    assert written_keys(out / "train") == {f"synth-{i:06d}" for i in range(3)}
    assert written_keys(out / "val") == {"synth-000003"}
    shards = sorted((out / "train").glob("*.tar"))
    assert len(shards) == 2  # shard_size 2: 2 + 1
    samples = [decode_sample(d) for s in sorted(out.glob("*/*.tar")) for d in iter_tar(s)]
    assert [s.key for s in samples] == [f"synth-{i:06d}" for i in range(4)]
    for s in samples:
        assert s.surface.shape == (512, 6) and s.vol.shape == (512, 4) and s.near.shape == (512, 4)
        assert s.sharp.shape[1] == 6 and s.sharp.shape[0] in (0, 128)
        assert len(s.renders) == 2 and s.renders[0].shape == (64, 64, 3) and s.renders[0].dtype == np.uint8
        assert s.meta["source"] == "synth" and s.meta["seed"] == 2 and s.meta["watertight"]
    # written by 2 worker processes, identical to an in-process run of the same index
    direct = make_sample(3, 2, TINY)
    assert np.array_equal(samples[-1].vol, direct.vol) and samples[-1].meta == direct.meta

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*.tar")}
    assert run_synth(out, num=4, seed=2, counts=TINY, workers=1, shard_size=2).written == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.tar")} == mtimes
    for p in (out / "val").iterdir():
        p.unlink()
    assert run_synth(out, num=4, seed=2, counts=TINY, workers=1, shard_size=2).written == 1
    assert written_keys(out / "val") == {"synth-000003"}
    with pytest.raises(ValueError, match="synth.json.*different settings.*seed"):
        run_synth(out, num=4, seed=3, counts=TINY)


def test_progress_in_a_log_file_writes_few_updates(capsys):
    """stderr not a terminal (pytest captures it, as a SLURM log would): a 0.8 s loop writes the bar's first and
    last states, where tqdm's default rate of ten a second would write about eight more."""
    assert list(progress((time.sleep(0.01) or i for i in range(80)), 80, "synth", "shape")) == list(range(80))
    err = capsys.readouterr().err
    assert err.count("\r") <= 3 and "80/80" in err, err


def test_sparse_grid_equals_dense_near_the_surface():
    shape, _, _ = normalize(random_shape(np.random.default_rng(4)), margin=0.05)
    lo, step, dims = np.full(3, -1.0), 2.0 / 48, (49, 49, 49)
    sparse = grid_values(shape, lo, step, dims)
    axes = [lo[a] + step * np.arange(dims[a]) for a in range(3)]
    dense = evaluate(shape, np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)).reshape(dims)
    near = np.abs(dense) <= np.sqrt(3) * step
    assert near.sum() > 1000 and np.array_equal(sparse[near], dense[near])
    assert np.array_equal(np.sign(sparse), np.sign(dense)) and np.all(np.abs(sparse) <= np.abs(dense) + 1e-12)
    assert np.mean(sparse == dense) < 0.5  # most of the grid was bounded, not evaluated


def test_split_sizes():
    assert split_sizes(6, 0.1) == (5, 1) and split_sizes(100, 0.1) == (90, 10)
    assert split_sizes(1, 0.1) == (1, 0) and split_sizes(2, 0.9) == (1, 1) and split_sizes(10, 0.0) == (10, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        run_synth("/nonexistent", num=3, val_fraction=1.0)
