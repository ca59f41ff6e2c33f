"""Hierarchical volume decoding against dense decoding: exact analytic SDFs of embedded-default shapes (a cut thin
shell and a torus difference), a smooth random VecSetVAE field, fields that the coarse levels under-resolve, and
batches with empty and all-inside shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fvdm.data.sdf import evaluate
from fvdm.data.synth import synth_shape
from fvdm.decoding.dense import DenseVolumeDecoder
from fvdm.decoding.grid import DecodedField, as_box, sample_field
from fvdm.decoding.hierarchical import (HierarchicalVolumeDecoder, SparseField, cascade, dilate, find_intersect)
from fvdm.decoding.marching_cubes import marching_cubes, sparse_marching_cubes
from fvdm.decoding.mesh import (EmptyMeshWarning, decode_mesh, marching_cubes_skimage, marching_cubes_torch)
from fvdm.models.vae import VAEConfig, VecSetVAE

SHAPES = (11, 4)  # embedded-default shapes: a cut cylindrical shell (thin open wall), a torus with a box cut out


class AnalyticSDF:
    """Stand-in with the VAE's decode/query API: latents [B, 1, 1] hold an index into ``shapes`` (or a far
    away / huge sphere for -1 / -2); query returns the exact SDF truncated at u, clamp(sdf / u, -1, 1)."""

    def __init__(self, shapes, truncation: float = 0.1):
        self.shapes, self.u = shapes, truncation

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def sdf(self, index: int, p: np.ndarray) -> np.ndarray:
        if index == -1:
            return np.linalg.norm(p - 5.0, axis=1) - 0.5  # nothing inside the box
        if index == -2:
            return np.linalg.norm(p, axis=1) - 10.0  # the whole box inside
        return evaluate(self.shapes[index], p)

    def query(self, tokens: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        out = [self.sdf(int(t[0, 0]), p.double().numpy()) for t, p in zip(tokens, points)]
        return torch.from_numpy(np.stack(out)).float().div(self.u).clamp(-1, 1)


@pytest.fixture(autouse=True)
def one_thread():
    """Small CPU tensors run much faster on one thread than on two shared, busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def analytic():
    return AnalyticSDF([synth_shape(np.random.default_rng([0, i]), 0.05).shape for i in SHAPES])


def latents(*index: int) -> torch.Tensor:
    return torch.tensor(index, dtype=torch.float32).view(-1, 1, 1)


def canonical(verts: torch.Tensor, faces: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Order-free form of a mesh: its sorted vertices, and its faces as rows of sorted-vertex ranks, each row
    rotated to start at its smallest rank (winding kept), rows sorted."""
    v, rank = np.unique(np.round(verts.double().numpy(), 6), axis=0, return_inverse=True)
    f = rank.reshape(-1)[faces.numpy()]  # [F, 3]
    f = np.stack([np.roll(row, -int(np.argmin(row))) for row in f]) if len(f) else f
    return v, f[np.lexsort(f.T[::-1])]


def same_mesh(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Same vertices and the same faces with the same winding, whatever the order."""
    (va, fa), (vb, fb) = canonical(*a), canonical(*b)
    return va.shape == vb.shape and np.array_equal(va, vb) and np.array_equal(fa, fb)


def queried_mask(field: SparseField, b: int) -> torch.Tensor:
    n = field.resolution + 1
    mask = torch.zeros(n**3, dtype=torch.bool)
    own = field.keys // n**3 == b
    mask[field.keys[own] % n**3] = True
    return mask.view(n, n, n)


def surface_cells_covered(dense: torch.Tensor, queried: torch.Tensor, level: float = 0.0) -> tuple[int, int]:
    """(sign-change cells of a dense grid [n, n, n], how many of them have all 8 corners queried)."""
    above = dense > level
    corners = [above[i:i + above.shape[0] - 1, j:j + above.shape[1] - 1, k:k + above.shape[2] - 1]
               for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    cross = torch.stack(corners).any(0) & ~torch.stack(corners).all(0)
    q = [queried[i:i + above.shape[0] - 1, j:j + above.shape[1] - 1, k:k + above.shape[2] - 1]
         for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    return int(cross.sum()), int((cross & torch.stack(q).all(0)).sum())


def test_cascade_nests_and_ends_at_the_requested_resolution():
    assert cascade(384, 48) == [48, 96, 192, 384]
    assert cascade(384, 63) == [96, 192, 384]  # the reference's cascade, without its 384 -> 380 snapping
    assert cascade(256, 48) == [64, 128, 256]
    assert cascade(300, 48) == [75, 150, 300]
    assert cascade(381, 48) == [127, 381]  # a factor 3
    assert cascade(383, 48) == [383] and cascade(64, 48) == [64]  # no factor left: one dense level
    for r in range(1, 600):
        levels = cascade(r, 40)
        assert levels[-1] == r and all(b % a == 0 and b // a in (2, 3) for a, b in zip(levels, levels[1:]))
        assert levels[0] >= 40 or len(levels) == 1


def test_flag_operators():
    above = torch.zeros(1, 5, 5, 5, dtype=torch.bool)
    above[0, 2, 2, 2] = True
    six = find_intersect(above)
    assert six.sum() == 7 and six[0, 2, 2, 2] and six[0, 1, 2, 2] and not six[0, 1, 1, 2]
    assert find_intersect(above, 26).sum() == 27
    assert dilate(above, 1).sum() == 27 and dilate(above, 2).sum() == 125 and dilate(above, 0).sum() == 1


FVDM_CASCADE = dict(near_band="cells", final_cells="crossing")  # fvdm's cascade: narrow band, surface following


@pytest.mark.parametrize("resolution,min_resolution,settings",
                         [(64, 32, {}), (96, 24, {}), (64, 32, FVDM_CASCADE), (96, 24, FVDM_CASCADE)])
def test_matches_dense_on_analytic_shapes(analytic, resolution, min_resolution, settings):
    lat = latents(0, 1)
    decoder = HierarchicalVolumeDecoder(min_resolution=min_resolution, **settings)
    sparse = decoder(analytic, lat, resolution, 1.01)
    dense = DenseVolumeDecoder()(analytic, lat, resolution, 1.01)
    assert [s.resolution for s in sparse.levels] == cascade(resolution, min_resolution)
    assert sparse.resolution == resolution and isinstance(sparse, SparseField)
    filled = sparse.to_dense().sdf
    for b in range(2):
        assert sparse.queries[b] == sum(s.queries[b] for s in sparse.levels)
        assert sparse.queries[b] < 0.4 * dense.queries[b]
        inside_h, inside_d = filled[b] < 0, dense.sdf[b] < 0
        assert (inside_h & inside_d).sum() / (inside_h | inside_d).sum() >= 0.999
        # every cell the dense surface crosses was refined: all 8 corners queried, so the meshes are identical
        crossing, covered = surface_cells_covered(dense.sdf[b], queried_mask(sparse, b))
        assert crossing > 1000 and covered == crossing
        hier_mesh = sparse_marching_cubes(*sparse.cells_of(b))
        dense_mesh = marching_cubes(dense.sdf[b])
        assert same_mesh(hier_mesh, dense_mesh)


def test_decode_mesh_hierarchical_is_watertight_and_reports_levels(analytic):
    decoder = HierarchicalVolumeDecoder(min_resolution=24)
    meshes = decode_mesh(analytic, latents(0, 1), 96, decoder=decoder)
    reference = decode_mesh(analytic, latents(0, 1), 96, decoder=DenseVolumeDecoder(), extractor=marching_cubes_torch)
    for mesh, ref in zip(meshes, reference):
        tm = mesh.to_trimesh()
        assert tm.is_watertight and tm.volume > 0
        assert tm.volume == pytest.approx(ref.to_trimesh().volume, rel=1e-6)
        assert np.allclose(np.sort(mesh.vertices, axis=0), np.sort(ref.vertices, axis=0))
        assert mesh.stats.level_queries.keys() == {24, 48, 96}
        assert sum(mesh.stats.level_queries.values()) == mesh.stats.queries < 0.35 * ref.stats.queries
        assert {"level_24", "level_48", "level_96", "decode", "volume", "extract"} <= set(mesh.stats.stages)


def test_sampled_field_matches_dense(analytic):
    sparse = HierarchicalVolumeDecoder(min_resolution=16)(analytic, latents(0, 1), 64, 1.01)
    dense = DenseVolumeDecoder()(analytic, latents(0, 1), 64, 1.01)
    points = torch.rand(2, 5000, 3) * 2.02 - 1.01
    a, b = sample_field(sparse, points), sample_field(dense, points)
    assert ((a < 0) == (b < 0)).float().mean() > 0.999
    base = ((points + 1.01) / 2.02 * 64).floor().long().clamp(max=63)  # [2, P, 3] lower corner of each cell
    for i in range(2):
        queried = queried_mask(sparse, i)
        covered = torch.stack([queried[tuple((base[i] + torch.tensor(o)).T)]
                               for o in np.ndindex(2, 2, 2)]).all(0)  # points whose 8 corners were queried
        assert covered.sum() > 100 and torch.allclose(a[i, covered], b[i, covered], atol=1e-5)
    grid = torch.tensor([[[-1.01, -1.01, -1.01], [1.01, 1.01, 1.01]]]).expand(2, -1, -1)
    assert torch.allclose(sample_field(dense, grid), dense.sdf[:, [0, -1], [0, -1], [0, -1]])


def bumpy(points: torch.Tensor) -> torch.Tensor:
    """A sphere with bumps far finer than the coarse levels (truncated at 0.05)."""
    r = points.norm(dim=-1) - 0.55
    bumps = 0.1 * torch.sin(35 * points[..., 0]) * torch.sin(31 * points[..., 1]) * torch.sin(28 * points[..., 2])
    return ((r + bumps) / 0.05).clamp(-1, 1)


class Bumpy:
    def decode(self, latents):
        return latents

    def query(self, tokens, points):
        return bumpy(points)


def test_surface_missed_by_coarse_levels_is_still_closed():
    # no FindNear, no dilation, a very coarse start, no surface following: the refined blocks miss parts of the
    # surface, so some surface cells straddle the queried set; they take the coarser level's fill and the mesh
    # stays closed
    decoder = HierarchicalVolumeDecoder(min_resolution=8, eta=None, dilation=0, follow_passes=0)
    sparse = decoder(Bumpy(), torch.zeros(1, 1, 1), 64, 1.01)
    filled = sparse.to_dense().sdf[0]
    crossing, covered = surface_cells_covered(filled, queried_mask(sparse, 0))
    assert covered < crossing  # the straddling case happens here
    mesh = sparse_marching_cubes(*sparse.cells_of(0))
    assert same_mesh(mesh, marching_cubes(filled))  # = marching cubes of the complete filled grid
    (decoded,) = decode_mesh(Bumpy(), torch.zeros(1, 1, 1), 64, decoder=decoder)
    assert decoded.to_trimesh().is_watertight


def test_surface_following_queries_less_for_the_same_mesh(analytic):
    # exact truncated SDFs at fvdm's u = 0.05: the narrow band and surface following leave the mesh identical to
    # the paper cascade's (and the dense one's) and query fewer points at the last two levels
    field = AnalyticSDF(analytic.shapes, truncation=0.05)
    lat = latents(0, 1)
    paper = HierarchicalVolumeDecoder(min_resolution=24)(field, lat, 96, 1.01)
    fvdm = HierarchicalVolumeDecoder(min_resolution=24, **FVDM_CASCADE)(field, lat, 96, 1.01)
    dense = DenseVolumeDecoder()(field, lat, 96, 1.01)
    for b in range(2):
        (_, p48, p96), (_, f48, f96) = ([s.queries[b] for s in x.levels] for x in (paper, fvdm))
        assert f48 <= p48 and f96 < 0.8 * p96
        crossing, covered = surface_cells_covered(dense.sdf[b], queried_mask(fvdm, b))
        assert covered == crossing
        assert same_mesh(sparse_marching_cubes(*fvdm.cells_of(b)), marching_cubes(dense.sdf[b]))


def test_surface_following_recovers_what_the_coarse_levels_missed():
    # the set-up of the test above: following the surface from the refined blocks at the final level queries the
    # parts the coarse levels missed. After the paper's final refinement that recovers every surface cell of this
    # field (4.5-Lipschitz, finer than the coarse levels); from the crossing cells alone it misses small pockets
    # that touch no refined block, and still recovers most
    dense = DenseVolumeDecoder()(Bumpy(), torch.zeros(1, 1, 1), 64, 1.01).sdf[0]

    def covered(**settings) -> tuple[SparseField, int, int]:
        decoder = HierarchicalVolumeDecoder(min_resolution=8, eta=None, dilation=0, **settings)
        sparse = decoder(Bumpy(), torch.zeros(1, 1, 1), 64, 1.01)
        return sparse, *surface_cells_covered(dense, queried_mask(sparse, 0))

    sparse, crossing, paper = covered()
    assert paper == crossing and same_mesh(sparse_marching_cubes(*sparse.cells_of(0)), marching_cubes(dense))
    assert covered(follow_passes=0)[2] < crossing
    _, _, unfollowed = covered(final_cells="crossing", follow_passes=0)
    followed, _, following = covered(final_cells="crossing")
    assert unfollowed < following < crossing
    filled = followed.to_dense().sdf[0]  # missed pockets take the fill: still the mesh of the complete grid
    assert same_mesh(sparse_marching_cubes(*followed.cells_of(0)), marching_cubes(filled))


def test_batch_with_empty_and_all_inside_shapes(analytic):
    decoder = HierarchicalVolumeDecoder(min_resolution=16)
    with pytest.warns(EmptyMeshWarning) as caught:
        meshes = decode_mesh(analytic, latents(-1, 0, -2, 1), 64, decoder=decoder)
    messages = sorted(str(w.message) for w in caught)
    assert "shape 0" in messages[0] and "outside" in messages[0]
    assert "shape 2" in messages[1] and "inside" in messages[1]
    assert meshes[0].is_empty and meshes[2].is_empty and not meshes[1].is_empty and not meshes[3].is_empty
    for i, shape in ((1, 0), (3, 1)):  # each shape's cells, split from the batch, give its mesh alone
        (alone,) = decode_mesh(analytic, latents(shape), 64, decoder=decoder)
        assert np.array_equal(alone.vertices, meshes[i].vertices) and np.array_equal(alone.faces, meshes[i].faces)
    assert meshes[0].stats.queries == meshes[2].stats.queries == 17**3  # nothing refined
    with pytest.warns(EmptyMeshWarning):  # a batch with no surface at all
        assert all(m.is_empty for m in decode_mesh(analytic, latents(-1, -2), 64, decoder=decoder))


def test_skimage_reference_reads_a_sparse_field(analytic):
    sparse = HierarchicalVolumeDecoder(min_resolution=16)(analytic, latents(1), 64, 1.01)
    (ref,) = marching_cubes_skimage(sparse)
    (fast,) = marching_cubes_torch(sparse)
    assert ref.to_trimesh().volume == pytest.approx(fast.to_trimesh().volume, rel=1e-3)


def test_torch_extractor_on_dense_fields_without_surface():
    sdf = torch.ones(3, 9, 9, 9)
    sdf[1] = -1.0
    sdf[2, 4, 4, 4] = float("nan")
    field = DecodedField(sdf=sdf, queries=[729] * 3, resolution=8, box=as_box(1.0))
    with pytest.warns(EmptyMeshWarning) as caught:
        meshes = marching_cubes_torch(field)
    assert all(m.is_empty for m in meshes)
    assert [w for w in map(str, (c.message for c in caught))] == [
        "decode_mesh: shape 0: no surface at level 0.0 (every point is outside); returning an empty mesh",
        "decode_mesh: shape 1: no surface at level 0.0 (every point is inside); returning an empty mesh",
        "decode_mesh: shape 2: the field has non-finite values; returning an empty mesh"]


def smooth_vae() -> VecSetVAE:
    """A tiny VecSetVAE, random init, low frequencies only, its output scaled and shifted so that the field is
    smooth, 30% inside, and beyond +-1 away from its surface (like a tSDF-trained one)."""
    torch.manual_seed(0)
    vae = VecSetVAE(VAEConfig(num_latents=32, width=32, heads=2, embed_dim=8, num_freqs=3, with_encoder=False,
                              num_decoder_layers=1)).eval()
    with torch.no_grad():
        tokens = vae.decode(torch.randn(1, 32, 8))
        p = torch.rand(1, 4096, 3) * 2 - 1
        raw = vae.query(tokens, p)
        vae.geo_decoder.output_proj.weight.mul_(6 / raw.std())
        vae.geo_decoder.output_proj.bias.sub_(vae.query(tokens, p).quantile(0.3))
    return vae


def test_tiny_vecset_vae_field():
    vae = smooth_vae()
    torch.manual_seed(0)
    lat = torch.randn(1, 32, 8)  # the latents smooth_vae was calibrated on
    decoder = HierarchicalVolumeDecoder(min_resolution=12)
    (mesh,) = decode_mesh(vae, lat, 48, decoder=decoder, extractor=marching_cubes_torch)
    (ref,) = decode_mesh(vae, lat, 48, decoder=DenseVolumeDecoder(), extractor=marching_cubes_torch)
    assert not ref.is_empty and mesh.stats.queries < 0.6 * ref.stats.queries
    assert np.allclose(np.sort(mesh.vertices, axis=0), np.sort(ref.vertices, axis=0), atol=1e-5)
    assert len(mesh.faces) == len(ref.faces)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="neighbours"):
        HierarchicalVolumeDecoder(neighbours=8)
    with pytest.raises(ValueError, match="eta"):
        HierarchicalVolumeDecoder(eta=0.0)
    with pytest.raises(ValueError, match="dilation"):
        HierarchicalVolumeDecoder(dilation=-1)
    with pytest.raises(ValueError, match="near_band"):
        HierarchicalVolumeDecoder(near_band="narrow")
    with pytest.raises(ValueError, match="final_cells"):
        HierarchicalVolumeDecoder(final_cells="sign")
    with pytest.raises(ValueError, match="follow_passes"):
        HierarchicalVolumeDecoder(follow_passes=-1)
    with pytest.raises(ValueError, match="method"):
        decode_mesh(Bumpy(), torch.zeros(1, 1, 1), 8, method="fastest")
