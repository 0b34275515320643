"""Point-cloud math: depth image -> world-frame points -> workspace crop -> farthest-point sample.

Pure numpy plus open3d's farthest-point sampling; no simulator. The simulator-facing part (which
camera, its pose) lives in the env, which passes the camera pose in.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import numpy as np

log = logging.getLogger(__name__)


@cache
def open3d() -> ModuleType:
    """Import open3d, first loading libusb (which its import needs) from the system or from pip."""
    try:
        ctypes.CDLL("libusb-1.0.so.0", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        import libusb_package  # pip fallback when the Debian package libusb-1.0-0 is absent

        ctypes.CDLL(str(libusb_package.get_library_path()), mode=ctypes.RTLD_GLOBAL)
    import open3d as o3d

    return o3d


@dataclass(frozen=True)
class CropBox:
    """Axis-aligned box in the world frame (metres)."""

    low: tuple[float, float, float]
    high: tuple[float, float, float]

    def contains(self, points: np.ndarray, tol: float = 0.0) -> np.ndarray:
        """Boolean mask of the points (N, 3) inside the box (enlarged by ``tol``)."""
        low = np.asarray(self.low) - tol
        high = np.asarray(self.high) + tol
        return np.all((points >= low) & (points <= high), axis=-1)


def depth_to_camera_points(depth: np.ndarray, fovy_deg: float) -> np.ndarray:
    """Back-project a metric depth image (H, W) to points (H*W, 3) in the OpenGL camera frame.

    OpenGL/MuJoCo camera axes: x right, y up, looking down -z. Row 0 of ``depth`` is the top of
    the image (as ``mujoco.Renderer`` returns it); square pixels, principal point at the centre.
    """
    h, w = depth.shape
    f = 0.5 * h / np.tan(np.deg2rad(fovy_deg) / 2)
    u = np.arange(w, dtype=np.float64) - (w - 1) / 2
    v = np.arange(h, dtype=np.float64) - (h - 1) / 2
    z = depth.astype(np.float64)
    x = u[None, :] * z / f
    y = -v[:, None] * z / f
    return np.stack([x, y, -z], axis=-1).reshape(-1, 3)


def camera_to_world(points: np.ndarray, cam_pos: np.ndarray, cam_mat: np.ndarray) -> np.ndarray:
    """Map camera-frame points (N, 3) to the world with the camera's position and 3x3 rotation."""
    return points @ np.asarray(cam_mat).reshape(3, 3).T + np.asarray(cam_pos)


def farthest_point_sample(points: np.ndarray, n: int) -> np.ndarray:
    """Down-sample (N, 3) points, or (N, 6) xyz + rgb in [0, 1], to exactly ``n`` by farthest-point
    sampling on xyz (open3d; the colours follow their points).

    Deterministic for a given input. With fewer than ``n`` points the cloud is padded by repeating
    points (all zeros if it is empty), so every step has the same shape.
    """
    width = points.shape[-1]
    if width not in (3, 6):
        raise ValueError(f"points must be (N, 3) or (N, 6) xyz + rgb, got {points.shape}")
    if len(points) > n:
        o3d = open3d()
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points[:, :3].astype(np.float64)))
        if width == 6:
            pcd.colors = o3d.utility.Vector3dVector(points[:, 3:].astype(np.float64))
        down = pcd.farthest_point_down_sample(n)
        out = np.asarray(down.points)
        if width == 6:
            out = np.concatenate([out, np.asarray(down.colors)], axis=1)
    else:
        out = points
    if len(out) < n:
        log.debug("point cloud has %d < %d points; padding by repetition", len(out), n)
        out = np.zeros((n, width)) if len(out) == 0 else out[np.arange(n) % len(out)]
    return out.astype(np.float32)


def depth_to_point_cloud(
    depth: np.ndarray,
    fovy_deg: float,
    cam_pos: np.ndarray,
    cam_mat: np.ndarray,
    box: CropBox,
    n_points: int,
) -> np.ndarray:
    """The whole pipeline: metric depth -> world frame -> crop to ``box`` -> ``n_points`` by FPS."""
    world = camera_to_world(depth_to_camera_points(depth, fovy_deg), cam_pos, cam_mat)
    return farthest_point_sample(world[box.contains(world)], n_points)
