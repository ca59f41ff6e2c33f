"""CPU ray-cast condition renders: framing, background, determinism and input errors."""
import numpy as np
import pytest
import trimesh

from fvdm.data.render import render_views


def test_sphere_is_a_centred_disc_on_white():
    sphere = trimesh.creation.icosphere(subdivisions=4)
    size = 96
    (img,) = render_views(sphere.vertices * 7.0 + [3.0, -2.0, 10.0], sphere.faces, num_views=1, size=size, seed=3)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert (img[0] == 255).all() and (img[-1] == 255).all() and (img[:, 0] == 255).all()  # white border
    mask = (img < 250).any(axis=2)
    ys, xs = np.nonzero(mask)
    centre = (size - 1) / 2
    assert abs(ys.mean() - centre) < 1.0 and abs(xs.mean() - centre) < 1.0
    radius = np.sqrt(mask.sum() / np.pi)
    assert 0.3 * size < radius < 0.5 * size  # fills most of the frame, never touches its edge
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - centre) ** 2 + (xx - centre) ** 2 <= radius**2
    assert (mask & disc).sum() / (mask | disc).sum() > 0.95  # round
    shaded = img[mask].astype(float)
    assert shaded.std() > 5.0  # Lambertian shading varies over the sphere


def test_views_differ_and_are_deterministic():
    box = trimesh.creation.box(extents=(1.0, 2.0, 0.5))
    views = render_views(box.vertices, box.faces, num_views=4, size=48, seed=0)
    assert len(views) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(views[i].astype(int) - views[j].astype(int)).mean() > 1.0
    again = render_views(box.vertices, box.faces, num_views=4, size=48, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(views, again))
    other = render_views(box.vertices, box.faces, num_views=4, size=48, seed=1)
    assert np.array_equal(views[0], other[0])  # view 0 is the canonical view whatever the seed
    assert not any(np.array_equal(a, b) for a, b in zip(views[1:], other[1:]))


@pytest.mark.parametrize(
    "vertices, faces, match",
    [
        (np.zeros((0, 3)), np.zeros((0, 3), int), "vertices"),
        (np.eye(3), np.zeros((0, 3), int), "faces"),
        (np.eye(3), np.array([[0, 1, 5]]), "indices"),
        (np.array([[0, 0, 0], [1, 0, 0], [np.nan, 0, 0]]), np.array([[0, 1, 2]]), "non-finite"),
        (np.ones((3, 3)), np.array([[0, 1, 2]]), "degenerate"),
    ],
)
def test_bad_input_raises_clear_error(vertices, faces, match):
    with pytest.raises(ValueError, match=match):
        render_views(vertices, faces, num_views=1, size=8)
