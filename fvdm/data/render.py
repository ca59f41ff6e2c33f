"""CPU condition renders by ray casting (trimesh + embreex): no GL, no GPU, no system package.

Each view is a perspective camera looking at the object's bounding-box centre: view 0 from a fixed canonical
direction, the others from deterministic pseudo-random azimuths/elevations, far enough that the bounding sphere fits in the frame. Pixels are shaded
grey with Lambertian light (two-sided, a light above-left of the camera) plus ambient, on a white background,
and rendered at ``supersample`` times the size and box-filtered down for anti-aliased silhouettes.
"""
from __future__ import annotations

import numpy as np
import trimesh
from trimesh.ray.ray_pyembree import RayMeshIntersector

FOV_DEG = 40.0  # full field of view of the square image
FIT = 1.15  # the bounding sphere's angular radius is 1 / FIT of the half field of view (sine)
AMBIENT = 0.3
BASE_COLOR = np.array([0.78, 0.78, 0.80])
ELEVATION_DEG = (-10.0, 40.0)  # cameras look from slightly below to well above (Y up)
CANONICAL_VIEW_DEG = (45.0, 20.0)  # (azimuth, elevation) of view 0


def _check(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 [V, 3] vertices and int64 [F, 3] faces; ValueError naming the problem."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"render_views: vertices must be a non-empty [V, 3] array, got shape {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"render_views: faces must be a non-empty [F, 3] array, got shape {f.shape}")
    if not np.issubdtype(f.dtype, np.integer) or f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"render_views: faces must be integer indices in [0, {len(v)})")
    if not np.isfinite(v).all():
        raise ValueError("render_views: vertices contain non-finite values")
    if np.ptp(v[np.unique(f)], axis=0).max() <= 0.0:
        raise ValueError("render_views: degenerate mesh (all vertices coincide)")
    return v, f.astype(np.int64)


def camera_angles(num_views: int, seed: int) -> np.ndarray:
    """[K, 2] (azimuth, elevation) in radians. View 0 is the fixed canonical view (``CANONICAL_VIEW_DEG``), so a
    model conditioned on it can tell the shape's orientation in the world frame (from a random view it
    cannot: nothing in the image says where the camera was); the other views spread their azimuths over the
    circle with jitter, at random elevations."""
    rng = np.random.default_rng(seed)
    k = max(num_views - 1, 0)
    az = (np.arange(k) + rng.uniform(0.0, 1.0, k)) / max(k, 1) * 2 * np.pi
    az = (az + rng.uniform(0.0, 2 * np.pi)) % (2 * np.pi)
    el = np.radians(rng.uniform(*ELEVATION_DEG, k))
    views = np.stack([az, el], axis=1)
    canonical = np.radians([CANONICAL_VIEW_DEG])
    return np.concatenate([canonical, views])[:num_views]


def _camera_rays(center: np.ndarray, radius: float, az: float, el: float, res: int):
    """Ray origins [res*res, 3], directions [res*res, 3], and the camera's (forward, right, up) axes."""
    half = np.radians(FOV_DEG) / 2
    dist = FIT * radius / np.sin(half)
    eye = center + dist * np.array([np.cos(el) * np.cos(az), np.sin(el), np.cos(el) * np.sin(az)])
    forward = (center - eye) / np.linalg.norm(center - eye)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    t = (2 * (np.arange(res) + 0.5) / res - 1) * np.tan(half)  # pixel centres on the image plane at depth 1
    ys, xs = np.meshgrid(-t, t, indexing="ij")  # row i goes down the image, column j goes right
    dirs = forward + xs.reshape(-1, 1) * right + ys.reshape(-1, 1) * up  # [res*res, 3]
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.broadcast_to(eye, dirs.shape), dirs, (forward, right, up)


def render_views(vertices: np.ndarray, faces: np.ndarray, num_views: int, size: int, seed: int = 0,
                 supersample: int = 2) -> list[np.ndarray]:
    """``num_views`` [size, size, 3] uint8 shaded renders of the mesh, centred on a white background."""
    v, f = _check(vertices, faces)
    if num_views < 0 or size < 1 or supersample < 1:
        raise ValueError(f"render_views: need num_views >= 0, size >= 1, supersample >= 1 "
                         f"(got {num_views}, {size}, {supersample})")
    used = v[np.unique(f)]
    center = (used.min(axis=0) + used.max(axis=0)) / 2
    radius = float(np.linalg.norm(used - center, axis=1).max())
    mesh = trimesh.Trimesh(v, f, process=False)
    normals = mesh.face_normals  # [F, 3], zero for degenerate faces
    caster = RayMeshIntersector(mesh)
    res = size * supersample
    images = []
    for az, el in camera_angles(num_views, seed):
        origins, dirs, (forward, right, up) = _camera_rays(center, radius, az, el, res)
        tri = caster.intersects_first(origins, dirs)  # [res*res], -1 where the ray misses
        hit = tri >= 0
        n = normals[tri[hit]]
        n *= -np.sign(np.einsum("ij,ij->i", n, dirs[hit]))[:, None]  # two-sided: face the camera
        light = -forward + 0.6 * up - 0.4 * right
        light /= np.linalg.norm(light)
        shade = AMBIENT + (1 - AMBIENT) * np.clip(n @ light, 0.0, 1.0)
        img = np.ones((res * res, 3))
        img[hit] = shade[:, None] * BASE_COLOR
        img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))  # box-filter down
        images.append(np.round(img * 255).astype(np.uint8))
    return images
