"""Point-cloud math against closed-form values."""

import numpy as np
import pytest
from difftori.datasets.pointcloud import (
    CropBox,
    camera_to_world,
    depth_to_camera_points,
    farthest_point_sample,
)


def test_backprojection_of_a_flat_wall():
    h, w, d, fovy = 9, 9, 2.0, 60.0
    pts = depth_to_camera_points(np.full((h, w), d, np.float32), fovy).reshape(h, w, 3)
    np.testing.assert_allclose(pts[..., 2], -d)  # OpenGL: the camera looks down -z
    np.testing.assert_allclose(pts[4, 4], [0, 0, -d], atol=1e-12)
    half = d * np.tan(np.deg2rad(fovy) / 2) * (h - 1) / h  # centre of the top row of pixels
    np.testing.assert_allclose(pts[0, 4], [0, half, -d], atol=1e-12)  # row 0 is the top: +y
    np.testing.assert_allclose(pts[4, w - 1], [half, 0, -d], atol=1e-12)  # last column: +x


def test_camera_to_world():
    rot = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)  # 90 deg about z
    out = camera_to_world(np.array([[1.0, 0, 0]]), np.array([0.5, 0.5, 1.0]), rot.ravel())
    np.testing.assert_allclose(out, [[0.5, 1.5, 1.0]])


def test_crop_box():
    box = CropBox((0, 0, 0), (1, 1, 1))
    pts = np.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [0.5, -0.1, 0.5]])
    assert box.contains(pts).tolist() == [True, False, False]
    assert box.contains(pts, tol=0.2).tolist() == [True, False, True]


def test_farthest_point_sampling_spreads_and_is_deterministic():
    rng = np.random.default_rng(0)
    blob = rng.normal(scale=0.01, size=(2000, 3))
    far = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    pts = np.concatenate([blob, far])
    out = farthest_point_sample(pts, 8)
    assert out.shape == (8, 3) and out.dtype == np.float32
    for p in far:  # FPS must pick the three isolated points; a random subset would not
        assert np.min(np.linalg.norm(out - p, axis=1)) < 1e-6
    np.testing.assert_array_equal(out, farthest_point_sample(pts, 8))
    # every output point is an input point
    assert np.all(np.min(np.linalg.norm(out[:, None] - pts[None].astype(np.float32), axis=2), axis=1) < 1e-6)


@pytest.mark.parametrize("n_in", [0, 3])
def test_farthest_point_sampling_pads_small_clouds(n_in):
    pts = np.arange(3 * n_in, dtype=float).reshape(n_in, 3)
    out = farthest_point_sample(pts, 5)
    assert out.shape == (5, 3)
    if n_in:
        assert {tuple(p) for p in out} == {tuple(p) for p in pts.astype(np.float32)}
    else:
        assert not out.any()
