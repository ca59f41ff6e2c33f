"""``fvdm prepare`` on generated and real meshes: failure reports, resume, SDF sign and magnitude, shard round trip."""
import json
from pathlib import Path

import igl
import numpy as np
import pytest
import trimesh

from fvdm.data.mesh import MeshError, load_mesh, normalize, sample_sharp_edges, signed_distance, watertight_remesh
from fvdm.data.prepare import content_hash, prepare_mesh, run_prepare
from fvdm.data.sampling import SampleCounts
from fvdm.data.shards import decode_sample, iter_tar, written_keys

COUNTS = SampleCounts(surface=512, sharp=128, vol=512, near=512, renders=2, render_size=32)
ASSIMP = Path("/usr/share/assimp/models")
needs_assimp = pytest.mark.skipif(not ASSIMP.is_dir(), reason=f"Debian package assimp-testmodels not installed "
                                                               f"({ASSIMP} missing)")


def open_sphere() -> trimesh.Trimesh:
    """A unit icosphere with a polar cap removed: a hole around +z, vertices exactly on the sphere."""
    s = trimesh.creation.icosphere(subdivisions=3)
    return trimesh.Trimesh(s.vertices, s.faces[s.triangles_center[:, 2] < 0.8])


def write_meshes(d: Path) -> tuple[list[Path], dict[Path, str]]:
    """Good meshes and bad files (with a word their failure reason must contain) in ``d``."""
    d.mkdir()
    good = [d / "sphere.ply", d / "box.obj", d / "open.stl"]
    trimesh.creation.icosphere(subdivisions=3).export(good[0])
    trimesh.creation.box(extents=(1.0, 0.5, 0.25)).export(good[1])
    open_sphere().export(good[2])
    bad = {d / "empty.obj": "empty file", d / "nan.obj": "non-finite", d / "line.obj": "degenerate",
           d / "garbage.ply": "cannot parse", d / "garbage.obj": "no faces", d / "points.obj": "no faces"}
    (d / "empty.obj").write_bytes(b"")
    (d / "nan.obj").write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 2 3 4\n")
    (d / "line.obj").write_text("v 0 0 0\nv 1 1 1\nv 2 2 2\nv 3 3 3\nf 1 2 3\nf 2 3 4\n")
    garbage = np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
    (d / "garbage.ply").write_bytes(garbage)
    (d / "garbage.obj").write_bytes(garbage[::-1])
    (d / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    (d / "notes.txt").write_text("not a mesh")  # ignored when its directory is expanded
    return good, bad


def failures(out: Path) -> dict[str, str]:
    return {r["file"]: r["reason"] for r in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}


def samples(out: Path) -> dict[str, object]:
    return {s.meta["source"]: s for tar in sorted(out.glob("shard-*.tar")) for s in map(decode_sample, iter_tar(tar))}


def test_prepare_reports_failures_resumes_and_round_trips(tmp_path):
    good, bad = write_meshes(tmp_path / "meshes")
    out = tmp_path / "out"
    report = run_prepare([str(tmp_path / "meshes"), str(tmp_path / "nowhere" / "*.obj")], out, counts=COUNTS,
                         shard_size=2, seed=1)
    assert report.succeeded == len(good) and report.skipped_existing == 0
    logged = failures(out)
    assert dict(report.failed) == logged
    for path, word in bad.items():
        assert word in logged[str(path)], (path, logged[str(path)])
    assert "matched no mesh files" in logged[str(tmp_path / "nowhere" / "*.obj")]
    assert len(list(out.glob("shard-*.tar"))) == 2  # 3 samples, at most 2 per shard

    got = samples(out)
    assert set(got) == {str(p) for p in good}
    for path in good:
        s = got[str(path)]
        assert s.key == content_hash(path) == s.meta["content_hash"]
        assert s.surface.shape == (COUNTS.surface, 6) and s.vol.shape == (COUNTS.vol, 4)
        assert s.near.shape == (COUNTS.near, 4) and len(s.renders) == 2 and s.renders[0].shape == (32, 32, 3)
        assert np.allclose(np.linalg.norm(s.surface[:, 3:], axis=1), 1.0, atol=1e-4)
        lim = 1 - COUNTS.margin
        assert np.abs(s.surface[:, :3]).max() <= lim + 1e-5
        assert np.isclose(np.abs(s.surface[:, :3]).max(axis=0).max(), lim, atol=0.05)  # touches the margin
        assert np.abs(s.vol[:, :3]).max() <= 1.0
        assert (s.vol[:, 3] < 0).any() and (s.vol[:, 3] > 0).any()
    assert got[str(good[0])].meta["watertight"] and not got[str(good[2])].meta["watertight"]
    assert len(got[str(good[1])].sharp) == COUNTS.sharp and len(got[str(good[0])].sharp) == 0  # box edges only

    again = run_prepare([str(tmp_path / "meshes")], out, counts=COUNTS, shard_size=2, seed=1)
    assert (again.succeeded, again.skipped_existing, len(again.failed)) == (0, len(good), len(bad))
    assert len(list(out.glob("shard-*.tar"))) == 2 and len(written_keys(out)) == len(good)


def test_open_mesh_sign_matches_exact_winding_number(tmp_path):
    mesh = open_sphere()
    path = tmp_path / "open.obj"
    mesh.export(path)
    run_prepare([str(path)], tmp_path / "out", counts=SampleCounts(surface=256, sharp=0, vol=4000, near=2000,
                                                                   renders=1, render_size=16))
    (s,) = samples(tmp_path / "out").values()
    center, scale = np.array(s.meta["normalization"]["center"]), s.meta["normalization"]["scale"]
    pts = np.concatenate([s.vol, s.near])
    original = pts[:, :3].astype(np.float64) / scale + center  # back to the mesh's own frame
    radius = np.linalg.norm(original, axis=1)
    away = (original[:, 2] < 0.5) & (np.abs(radius - 1.0) > 0.02)  # off the surface, away from the hole
    assert away.sum() > 1000
    gwn = igl.winding_number(mesh.vertices, mesh.faces.astype(np.int64), original[away])
    inside = np.abs(gwn) > 0.5
    assert inside.any() and (~inside).any()
    assert np.array_equal(pts[away, 3] < 0, inside)


def test_distance_matches_trimesh_closest_point():
    mesh = open_sphere()
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(-1.5, 1.5, (150, 3)), mesh.sample(50, seed=1) + rng.normal(0, 0.01, (50, 3))])
    sdf = signed_distance(mesh.vertices, mesh.faces, points)
    _, dist, _ = trimesh.proximity.closest_point(mesh, points)
    np.testing.assert_allclose(np.abs(sdf), dist, atol=1e-6)


def test_inside_out_mesh_is_flipped_and_signed_the_same(tmp_path):
    box = trimesh.creation.box()
    box.invert()
    box.export(tmp_path / "inverted.ply")
    mesh = load_mesh(tmp_path / "inverted.ply")
    assert mesh.volume > 0
    sd = signed_distance(box.vertices, box.faces, np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
    np.testing.assert_allclose(sd, [-0.5, 1.5])


def test_load_limits_and_unsupported_files(tmp_path):
    trimesh.creation.icosphere(subdivisions=2).export(tmp_path / "s.off")
    with pytest.raises(MeshError, match="too many faces: 320 > limit 100"):
        load_mesh(tmp_path / "s.off", max_faces=100)
    (tmp_path / "s.txt").write_text("v 0 0 0")
    with pytest.raises(MeshError, match="unsupported extension"):
        load_mesh(tmp_path / "s.txt")
    report = run_prepare([str(tmp_path / "s.off")], tmp_path / "out", counts=COUNTS, max_faces=100)
    assert report.succeeded == 0 and "too many faces" in report.failed[0][1]


def test_sharp_edges_lie_on_cube_edges():
    cube, _, _ = normalize(trimesh.creation.box(), margin=0.0)
    sharp = sample_sharp_edges(cube, 300, np.random.default_rng(0))
    assert sharp.shape == (300, 6)
    on_faces = np.isclose(np.abs(sharp[:, :3]), 1.0, atol=1e-5).sum(axis=1)
    assert (on_faces >= 2).all()  # every point sits on two cube faces at once: an edge
    assert np.allclose(np.linalg.norm(sharp[:, 3:], axis=1), 1.0, atol=1e-5)


def test_watertight_remesh_closes_the_hole(tmp_path):
    mesh = open_sphere()
    closed = watertight_remesh(mesh.vertices * 0.9, mesh.faces, resolution=64, coarse=16)
    assert closed.is_watertight and closed.volume > 0
    assert abs(closed.volume - mesh.convex_hull.volume * 0.9**3) / closed.volume < 0.05

    mesh.export(tmp_path / "open.ply")
    counts = SampleCounts(surface=2000, sharp=0, vol=256, near=256, renders=1, render_size=16)
    run_prepare([str(tmp_path / "open.ply")], tmp_path / "a", counts=counts)
    run_prepare([str(tmp_path / "open.ply")], tmp_path / "b", counts=counts, watertight=True, workers=2)
    (plain,), (remeshed,) = samples(tmp_path / "a").values(), samples(tmp_path / "b").values()
    assert remeshed.meta["watertight_remesh"] and not remeshed.meta["watertight"]
    norm, _, _ = normalize(mesh, counts.margin)  # the frame prepare samples in

    def off_surface(s):  # surface samples farther than 0.03 from the input: only where the hole was filled
        return (np.abs(signed_distance(norm.vertices, norm.faces, s.surface[:, :3])) > 0.03).sum()

    assert off_surface(plain) == 0 and off_surface(remeshed) > 20


@needs_assimp
def test_assimp_real_and_malformed_models(tmp_path):
    real = ["OFF/Wuson.off", "STL/Spider_binary.stl", "glTF2/BoxTextured-glTF-Binary/BoxTextured.glb",
            "PLY/cube_binary.ply", "STL/sphereWithHole.stl"]
    broken = {"invalid/empty.obj": "empty file", "invalid/malformed.obj": "cannot parse",
              "invalid/OutOfMemory.off": "cannot parse", "OBJ/point_cloud.obj": "no faces",
              "glTF2/BoxWithInfinites-glTF-Binary/BoxWithInfinites.glb": "non-finite",
              "PLY/pond.0.ply": "cannot parse"}
    out = tmp_path / "out"
    report = run_prepare([str(ASSIMP / p) for p in real + list(broken)], out, counts=COUNTS)
    assert report.succeeded == len(real)
    logged = failures(out)
    assert set(logged) == {str(ASSIMP / p) for p in broken}
    for p, word in broken.items():
        assert word in logged[str(ASSIMP / p)]
    got = samples(out)
    wuson = got[str(ASSIMP / "OFF/Wuson.off")]  # wound inside-out in the file: still has an inside
    assert (wuson.vol[:, 3] < 0).any() and (wuson.near[:, 3] < 0).any()


def test_prepare_mesh_is_deterministic(tmp_path):
    path = tmp_path / "box.glb"
    trimesh.Scene([trimesh.creation.box(), trimesh.creation.icosphere(1).apply_translation([2, 0, 0])]).export(path)
    a, b = (prepare_mesh(path, content_hash(path), COUNTS, seed=3) for _ in range(2))
    for name in ("surface", "sharp", "vol", "near"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert all(np.array_equal(x, y) for x, y in zip(a.renders, b.renders))
    assert a.meta["num_faces"] == 12 + 80  # the scene's two meshes flattened into one
    c = prepare_mesh(path, content_hash(path), COUNTS, seed=4)
    assert not np.array_equal(a.vol, c.vol)
