"""Torch marching cubes vs scikit-image: exact match with the classic (Lorensen) table, dense and sparse."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes as sk_marching_cubes
from skimage.measure import mesh_surface_area

from fvdm.decoding import mc_tables
from fvdm.decoding.marching_cubes import cells_from_points, marching_cubes, sparse_marching_cubes


def _grid(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axis = np.linspace(-1.0, 1.0, n)
    return np.meshgrid(axis, axis, axis, indexing="ij")


def sphere_sdf(n: int = 33, radius: float = 0.6) -> np.ndarray:
    x, y, z = _grid(n)
    return (np.sqrt(x**2 + y**2 + z**2) - radius).astype(np.float32)


def torus_sdf(n: int = 41, major: float = 0.55, minor: float = 0.22) -> np.ndarray:
    x, y, z = _grid(n)
    return (np.sqrt((np.sqrt(x**2 + y**2) - major) ** 2 + z**2) - minor).astype(np.float32)


def box_with_hole_sdf(n: int = 41) -> np.ndarray:
    """A box [-0.7, 0.7] x [-0.7, 0.7] x [-0.4, 0.4] with a cylindrical hole of radius 0.3 along z (genus 1).

    Its flat faces sit exactly on grid points (spacing 0.05), so many values equal the level: degenerate cases.
    """
    x, y, z = _grid(n)
    q = np.abs(np.stack([x, y, z])) - np.array([0.7, 0.7, 0.4])[:, None, None, None]
    box = np.linalg.norm(np.maximum(q, 0), axis=0) + np.minimum(q.max(0), 0)
    hole = 0.3 - np.sqrt(x**2 + y**2)
    return np.round(np.maximum(box, hole), 6).astype(np.float32)


def smooth_random(shape=(26, 24, 22), seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(shape)
    field = gaussian_filter(noise, 2.5)
    return (field / field.std()).astype(np.float32)


def skimage_mesh(volume: np.ndarray, level: float = 0.0, method: str = "lorensen") -> tuple[np.ndarray, np.ndarray]:
    verts, faces, _, _ = sk_marching_cubes(volume, level, method=method)
    return verts, faces


def torch_mesh(volume: np.ndarray, level: float = 0.0, **kw) -> tuple[np.ndarray, np.ndarray]:
    verts, faces = marching_cubes(torch.from_numpy(volume), level, **kw)
    assert verts.dtype == torch.float32 and faces.dtype == torch.long
    return verts.numpy(), faces.numpy()


def canonical_faces(faces: np.ndarray) -> np.ndarray:
    """Each face as its lexicographically smallest rotation (winding kept), rows sorted: a face multiset."""
    faces = np.asarray(faces, dtype=np.int64)
    rotations = np.stack([faces, faces[:, [1, 2, 0]], faces[:, [2, 0, 1]]], 1)  # [F, 3, 3]
    base = faces.max(initial=0) + 1
    code = (rotations[..., 0] * base + rotations[..., 1]) * base + rotations[..., 2]  # [F, 3]
    rotated = rotations[np.arange(len(faces)), code.argmin(1)]
    return rotated[np.lexsort(rotated.T[::-1])]


def assert_same_mesh(ours: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray], tol: float = 1e-4):
    """Same vertices (within tol) and same faces with the same winding, up to ordering.

    Vertices are compared by position: scikit-image keeps coincident vertices where a value equals the level,
    so faces are compared as triples of distinct positions.
    """
    (v, f), (rv, rf) = ours, ref
    assert v.shape == rv.shape and f.shape == rf.shape
    positions, ref_position = np.unique(rv, axis=0, return_inverse=True)
    dist, our_position = cKDTree(positions).query(v)
    assert dist.max() < tol
    assert len(np.unique(our_position)) == len(positions) == len(np.unique(v, axis=0))
    np.testing.assert_array_equal(canonical_faces(our_position[f]), canonical_faces(ref_position.ravel()[rf]))


def edge_counts(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of undirected and of directed edges."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    _, undirected = np.unique(np.sort(directed, 1), axis=0, return_counts=True)
    _, directed_counts = np.unique(directed, axis=0, return_counts=True)
    return undirected, directed_counts


def is_watertight(faces: np.ndarray) -> bool:
    """Every edge shared by exactly two faces, traversed once in each direction (closed and oriented)."""
    undirected, directed = edge_counts(faces)
    return bool(len(faces)) and bool((undirected == 2).all() and (directed == 1).all())


def signed_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    t = verts[faces].astype(np.float64)
    return float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6)


def band_points(volume: np.ndarray, level: float = 0.0, dilate: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The corners of every cell within ``dilate`` cells of a sign-change cell: what a sparse decoder evaluates."""
    v = torch.from_numpy(volume)[None, None]
    above = (v > level).float()
    any_above = torch.nn.functional.max_pool3d(above, 2, stride=1)
    all_above = -torch.nn.functional.max_pool3d(-above, 2, stride=1)
    crossing = (any_above != all_above).float()  # [1, 1, X-1, Y-1, Z-1]
    band = torch.nn.functional.max_pool3d(crossing, 2 * dilate + 1, stride=1, padding=dilate)
    points = torch.nn.functional.max_pool3d(torch.nn.functional.pad(band, (1,) * 6), 2, stride=1)[0, 0] > 0
    indices = torch.nonzero(points)  # [P, 3]
    return indices, torch.from_numpy(volume)[points]


def sparse_mesh(volume: np.ndarray, level: float = 0.0, **kw) -> tuple[np.ndarray, np.ndarray]:
    indices, values = band_points(volume, level)
    cells, corner_values = cells_from_points(indices, values, volume.shape[0] - 1)
    assert len(cells) < 0.8 * np.prod(np.array(volume.shape) - 1)  # not the whole grid
    verts, faces = sparse_marching_cubes(cells, corner_values, level, **kw)
    return verts.numpy(), faces.numpy()


def test_tables_cut_exactly_the_sign_change_edges():
    """First-principles check of the table: each case's triangles use exactly the edges whose ends differ."""
    table = mc_tables.triangle_table()
    assert len(table) == 256 and all(len(row) == 3 * mc_tables.MAX_TRIANGLES for row in table)
    for case, row in enumerate(table):
        above = [(case >> c) & 1 for c in range(8)]
        cut = {e for e, (a, b) in enumerate(mc_tables.EDGE_CORNERS) if above[a] != above[b]}
        edges = [e for e in row if e >= 0]
        assert len(edges) % 3 == 0 and set(edges) == cut, case
        assert all(len(set(edges[t:t + 3])) == 3 for t in range(0, len(edges), 3)), case


def test_every_case_on_white_noise_matches_skimage_lorensen():
    volume = np.random.default_rng(1).standard_normal((14, 15, 16)).astype(np.float32)
    cases = sum((volume[i:13 + i, j:14 + j, k:15 + k] > 0).astype(int) << c
                for c, (i, j, k) in enumerate(mc_tables.CORNER_OFFSETS))
    assert len(np.unique(cases)) == 256  # all cases exercised
    assert_same_mesh(torch_mesh(volume, allow_degenerate=True), skimage_mesh(volume))
    assert_same_mesh(torch_mesh(volume), skimage_mesh(volume))  # no value equals the level: nothing to merge


@pytest.mark.parametrize("level", [0.0, 0.4])
def test_smooth_random_field_dense_and_sparse_match_skimage(level):
    volume = smooth_random()
    ref = skimage_mesh(volume, level)
    assert_same_mesh(torch_mesh(volume, level), ref)
    assert_same_mesh(sparse_mesh(volume, level), ref)


@pytest.mark.parametrize("make", [sphere_sdf, torus_sdf], ids=["sphere", "torus"])
def test_closed_sdfs_match_skimage_and_are_watertight(make):
    volume = make()
    ref = skimage_mesh(volume)
    dense, sparse = torch_mesh(volume), sparse_mesh(volume)
    assert_same_mesh(dense, ref)
    assert_same_mesh(sparse, ref)
    assert is_watertight(ref[1])
    assert is_watertight(dense[1]) and is_watertight(sparse[1])
    v, f = dense
    euler = len(v) - len(edge_counts(f)[0]) + len(f)  # V - E + F: 2 for a sphere, 0 for a torus
    assert euler == (2 if make is sphere_sdf else 0)


@pytest.mark.parametrize("make", [sphere_sdf, torus_sdf, box_with_hole_sdf], ids=["sphere", "torus", "box_hole"])
def test_close_to_skimage_lewiner(make):
    """The default (Lewiner) method differs only in ambiguous cells: counts, area and volume agree closely."""
    volume = make()
    (v, f), (lv, lf) = torch_mesh(volume, allow_degenerate=True), skimage_mesh(volume, method="lewiner")
    assert abs(len(f) - len(lf)) <= 0.01 * len(lf)
    assert mesh_surface_area(v, f) == pytest.approx(mesh_surface_area(lv, lf), rel=5e-3)
    assert signed_volume(v, f) == pytest.approx(signed_volume(lv, lf), rel=5e-3)
    if is_watertight(lf):
        assert is_watertight(torch_mesh(volume)[1])


def test_orientation_is_outward_for_negative_inside_sdf():
    n, radius = 41, 0.6
    v, f = torch_mesh(sphere_sdf(n, radius))
    radius_index = radius * (n - 1) / 2  # in grid index units
    assert signed_volume(v, f) == pytest.approx(4 / 3 * np.pi * radius_index**3, rel=0.02)
    normals = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    outward = v[f].mean(1) - (n - 1) / 2
    slivers = np.linalg.norm(normals, axis=1) < 1e-4  # too thin for a reliable normal direction
    assert slivers.mean() < 0.01
    assert (np.einsum("ij,ij->i", normals, outward)[~slivers] > 0).all()


def test_degenerate_triangles_merged_or_kept():
    """Values exactly at the level: kept as in scikit-image, or merged into a closed mesh with no zero-area face."""
    volume = box_with_hole_sdf()
    assert (volume == 0).sum() > 100
    ref = skimage_mesh(volume)
    kept = torch_mesh(volume, allow_degenerate=True)
    assert_same_mesh(kept, ref)
    v, f = torch_mesh(volume)
    assert len(f) < len(kept[1])
    assert ((f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])).all()
    assert len(np.unique(f)) == len(v)  # no unused vertex left behind
    assert len(np.unique(v, axis=0)) == len(v)  # coincident vertices merged
    assert mesh_surface_area(v, f) == pytest.approx(mesh_surface_area(*ref), rel=1e-5)
    assert is_watertight(f)
    sv, sf = sparse_mesh(volume)
    assert_same_mesh((sv, sf), (v, f))


def test_sparse_vertices_follow_cell_coordinates():
    """Edge ids come from the integer cell coordinates: a shifted cell list gives the same mesh, shifted."""
    volume = sphere_sdf(17)
    indices, values = band_points(volume)
    cells, corner_values = cells_from_points(indices, values, 16)
    v, f = sparse_marching_cubes(cells, corner_values)
    order = torch.randperm(len(cells), generator=torch.Generator().manual_seed(0))
    shifted = sparse_marching_cubes(cells[order] + torch.tensor([100, -7, 3]), corner_values[order])
    assert_same_mesh((shifted[0].numpy(), shifted[1].numpy()), ((v + torch.tensor([100.0, -7.0, 3.0])).numpy(),
                                                               f.numpy()))


def test_cells_from_points_keeps_only_complete_cells():
    rng = np.random.default_rng(2)
    resolution = 6
    evaluated = rng.random((resolution + 1,) * 3) < 0.8  # a random subset of the grid points
    values = rng.standard_normal((resolution + 1,) * 3).astype(np.float32)
    indices = torch.nonzero(torch.from_numpy(evaluated))
    perm = torch.from_numpy(rng.permutation(len(indices)))
    cells, corner_values = cells_from_points(indices[perm], torch.from_numpy(values[evaluated])[perm], resolution)
    expected = {(i, j, k) for i in range(resolution) for j in range(resolution) for k in range(resolution)
                if all(evaluated[i + a, j + b, k + c] for a, b, c in mc_tables.CORNER_OFFSETS)}
    assert {tuple(c) for c in cells.tolist()} == expected and len(cells) == len(expected)
    for (i, j, k), row in zip(cells.tolist(), corner_values.tolist()):
        assert row == [values[i + a, j + b, k + c] for a, b, c in mc_tables.CORNER_OFFSETS]


def test_incomplete_band_leaves_holes():
    """The watertightness check can fail: dropping sign-change cells opens the sparse mesh."""
    volume = sphere_sdf(21)
    indices, values = band_points(volume)
    cells, corner_values = cells_from_points(indices, values, 20)
    keep = cells[:, 0] != 10
    _, faces = sparse_marching_cubes(cells[keep], corner_values[keep])
    assert len(faces) and not is_watertight(faces.numpy())


def test_empty_inputs_give_empty_meshes():
    for verts, faces in [
        marching_cubes(torch.ones(5, 6, 7)),
        marching_cubes(-torch.ones(5, 6, 7)),
        marching_cubes(torch.randn(1, 6, 7)),
        marching_cubes(torch.ones(5, 6, 7), level=0.5),  # all values above the level
        sparse_marching_cubes(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 8)),
        sparse_marching_cubes(torch.zeros(3, 3, dtype=torch.long), -torch.ones(3, 8)),
        sparse_marching_cubes(*cells_from_points(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0), 8)),
    ]:
        assert verts.shape == (0, 3) and verts.dtype == torch.float32
        assert faces.shape == (0, 3) and faces.dtype == torch.long


def test_bad_input_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="3-D floating"):
        marching_cubes(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="3-D floating"):
        marching_cubes(torch.zeros(4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite"):
        marching_cubes(torch.tensor(sphere_sdf(9)).index_fill_(0, torch.tensor([4]), float("nan")))
    with pytest.raises(ValueError, match=r"corner_values must be a floating tensor \[M, 8\]"):
        sparse_marching_cubes(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 7))
    with pytest.raises(ValueError, match="integer tensor"):
        sparse_marching_cubes(torch.zeros(3, 3), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="duplicate"):
        cells_from_points(torch.tensor([[0, 0, 0], [1, 1, 1], [0, 0, 0]]), torch.zeros(3), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        cells_from_points(torch.tensor([[0, 0, 5]]), torch.zeros(1), 4)
