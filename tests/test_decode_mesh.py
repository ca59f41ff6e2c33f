"""decode_mesh, the dense volume decoder and the grid on analytic fields (spheres and boxes, exact truncated SDF)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from fvdm.decoding.dense import DenseVolumeDecoder, query_chunked
from fvdm.decoding.grid import Box, as_box, grid_points, index_to_world
from fvdm.decoding.mesh import EmptyMeshWarning, Mesh, decode_mesh

SPHERE, BOX = 0.0, 1.0


class AnalyticVAE(torch.nn.Module):
    """Test double with the VAE's decode/query API. Latents [B, 1, 7] = (kind, centre xyz, a, b, c): kind 0 is a
    sphere of radius a, kind 1 a box of half extents (a, b, c). query returns the exact SDF truncated at u, / u."""

    def __init__(self, truncation: float = 0.1):
        super().__init__()
        self.u = truncation
        self.decode_calls = 0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.decode_calls += 1
        return latents

    def query(self, tokens: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        kind, centre, ext = tokens[:, :, 0], tokens[:, :, 1:4], tokens[:, :, 4:7]  # [B, 1], [B, 1, 3], [B, 1, 3]
        d = points - centre  # [B, P, 3]
        sphere = d.norm(dim=-1) - ext[..., 0]
        q = d.abs() - ext
        box = q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0)
        sdf = torch.where(kind == SPHERE, sphere, box)
        return sdf.clamp(-self.u, self.u) / self.u


def sphere(centre, radius) -> list[float]:
    return [SPHERE, *centre, radius, 0.0, 0.0]


def box(centre, half) -> list[float]:
    return [BOX, *centre, *half]


def latents(*shapes) -> torch.Tensor:
    return torch.tensor(shapes, dtype=torch.float32)[:, None, :]  # [B, 1, 7]


def test_grid_mapping_is_exact_and_ordered():
    box_ = as_box((-0.8, -0.9, -1.0, 0.9, 0.8, 0.7))
    r = 10
    assert np.allclose(index_to_world([0, 0, 0], r, box_), box_.lo)
    assert np.allclose(index_to_world([r, r, r], r, box_), box_.hi)
    assert np.allclose(index_to_world([5, 5, 5], r, box_), (np.array(box_.lo) + box_.hi) / 2)
    pts = grid_points(torch.arange((r + 1) ** 3), r, box_).numpy()  # [(R+1)^3, 3], x slowest
    axes = [np.array(box_.lo[i]) + np.arange(r + 1) / r * box_.size[i] for i in range(3)]
    ref = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    assert np.allclose(pts, ref, atol=1e-6)
    assert as_box(1.01) == as_box((-1.01, 1.01)) == Box((-1.01,) * 3, (1.01,) * 3)
    with pytest.raises(ValueError, match="bounds"):
        as_box((1.0, -1.0))
    with pytest.raises(ValueError, match="bounds"):
        as_box((0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="resolution"):
        index_to_world([0, 0, 0], 0, 1.0)


def test_dense_decoder_matches_the_field_in_any_chunking():
    vae, lat = AnalyticVAE(), latents(sphere((0.1, 0.0, -0.2), 0.4), box((0.0, 0.2, 0.1), (0.3, 0.2, 0.5)))
    r = 12
    whole = DenseVolumeDecoder(chunk_size=10 ** 6)(vae, lat, r, 1.0)
    odd = DenseVolumeDecoder(chunk_size=997)(vae, lat, r, 1.0)  # chunks that do not divide the grid
    assert whole.sdf.shape == (2, r + 1, r + 1, r + 1) and whole.queries == [(r + 1) ** 3] * 2
    assert torch.equal(whole.sdf, odd.sdf)
    x = torch.linspace(-1, 1, r + 1)
    pts = torch.stack(torch.meshgrid(x, x, x, indexing="ij"), dim=-1).reshape(1, -1, 3).expand(2, -1, -1)
    expected = vae.query(lat, pts).view(2, r + 1, r + 1, r + 1)  # sdf[b, i, j, k] is the field at (x_i, y_j, z_k)
    assert torch.allclose(whole.sdf, expected, atol=1e-5)
    assert torch.allclose(query_chunked(vae, lat, pts, chunk_size=333), vae.query(lat, pts))


def check_sphere(mesh: Mesh, centre, radius, voxel):
    v = mesh.vertices.astype(np.float64)
    assert mesh.vertices.dtype == np.float32 and mesh.faces.dtype == np.int64
    radii = np.linalg.norm(v - centre, axis=1)
    assert np.abs(radii - radius).max() < 0.25 * voxel
    tm = mesh.to_trimesh()
    assert tm.is_watertight
    assert tm.volume > 0 and tm.volume == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.01)
    outward = np.einsum("ij,ij->i", tm.face_normals, tm.triangles_center - centre)
    assert (outward > 0).all()  # every face normal points away from the centre


def check_box(mesh: Mesh, lo, hi):
    v = mesh.vertices.astype(np.float64)
    # the box's faces carry a linear field, so interpolated vertices land on them exactly (up to float32)
    assert np.abs(v.min(axis=0) - lo).max() < 1e-5 and np.abs(v.max(axis=0) - hi).max() < 1e-5
    assert mesh.to_trimesh().volume > 0


def test_sphere_radius_volume_and_orientation():
    centre, radius, r = np.array([0.1, -0.05, 0.2]), 0.5, 64
    vae = AnalyticVAE()
    (mesh,) = decode_mesh(vae, latents(sphere(centre, radius)), resolution=r)
    check_sphere(mesh, centre, radius, voxel=2.02 / r)
    assert mesh.stats.queries == (r + 1) ** 3 and mesh.stats.seconds >= 0
    assert set(mesh.stats.stages) == {"decode", "volume", "extract"}


@pytest.mark.parametrize("resolution,bounds", [(50, (-1.01, 1.01)), (37, (-0.8, -0.9, -1.0, 0.9, 0.8, 0.7))])
def test_box_vertices_land_on_the_box_faces(resolution, bounds):
    # an off-centre box whose faces fall between grid planes; a mapping that divides by R + 1 misses by ~1e-2
    lo, hi = np.array([-0.43, -0.21, -0.6]), np.array([0.57, 0.41, 0.3])
    (mesh,) = decode_mesh(AnalyticVAE(), latents(box((lo + hi) / 2, (hi - lo) / 2)), resolution, bounds)
    check_box(mesh, lo, hi)


@pytest.mark.parametrize("shape,where", [(sphere((5.0, 5.0, 5.0), 0.5), "outside"),
                                         (sphere((0.0, 0.0, 0.0), 10.0), "inside")])
def test_field_without_surface_gives_empty_mesh_and_warning(shape, where):
    with pytest.warns(EmptyMeshWarning, match=where):
        (mesh,) = decode_mesh(AnalyticVAE(), latents(shape), resolution=16)
    assert mesh.is_empty and mesh.vertices.shape == (0, 3) and mesh.faces.shape == (0, 3)
    assert mesh.stats.queries == 17 ** 3
    assert isinstance(mesh.to_trimesh(), trimesh.Trimesh)


def test_batch_of_different_shapes_decodes_once():
    vae, r = AnalyticVAE(), 48
    c, rad = np.array([-0.2, 0.1, 0.0]), 0.6
    lo, hi = np.array([-0.5, -0.3, -0.2]), np.array([0.4, 0.6, 0.35])
    with pytest.warns(EmptyMeshWarning, match="shape 2"):
        meshes = decode_mesh(vae, latents(sphere(c, rad), box((lo + hi) / 2, (hi - lo) / 2),
                                          sphere((3.0, 0.0, 0.0), 0.2)), resolution=r,
                             decoder=DenseVolumeDecoder(chunk_size=5000))
    assert vae.decode_calls == 1 and len(meshes) == 3
    check_sphere(meshes[0], c, rad, voxel=2.02 / r)
    check_box(meshes[1], lo, hi)
    assert meshes[2].is_empty


def test_bad_latents_are_rejected():
    with pytest.raises(ValueError, match="latents"):
        decode_mesh(AnalyticVAE(), torch.zeros(7), resolution=8)
    with pytest.raises(ValueError, match="resolution"):
        decode_mesh(AnalyticVAE(), latents(sphere((0, 0, 0), 0.5)), resolution=0)
