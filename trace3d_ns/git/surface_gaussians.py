"""Perfect-geometry Gaussians of a generated demo scene, for tests and evaluations without training.

Every view of the scene (:mod:`trace3d_ns.scene.generate`) is ray cast through its pixel centres;
each hit becomes a candidate flat disc on the surface, oriented by the face normal (turned towards
the camera), sized by the pixel footprint ``depth / focal``. Candidates from all views are thinned:
footprints are rounded to power-of-two multiples of the finest one and, from the finest level up,
one disc is kept per voxel of its level's size unless a finer disc already lies in that voxel, so
every surface point gets the finest footprint any view sees it at, not one disc per view. Every
disc carries the instance id of the mesh it lies on (ground = 0), which is what
:func:`render_instance_ids` renders back.

Cameras are returned in the rasterizer's convention (OpenCV world-to-camera ``viewmats``, pinhole
``Ks``) and reproduce the generator's pixel grid, so rendering ``instance_ids`` gives
``gt_instances`` up to disc edges at silhouettes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from trace3d_ns.scene.generate import SCENE_FILE, SceneSpec, layout_scene, make_cameras

OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
"""Flips camera y and z: an OpenGL camera-to-world times this is an OpenCV camera-to-world."""


@dataclass
class SurfaceGaussiansConfig:
    """How discs are sampled from the ray-cast surface."""

    stride: int = 1
    """Candidate discs are taken at every ``stride``-th pixel centre of every view (in x and y)."""
    radius_factor: float = 0.45
    """Disc standard deviation in units of its voxel size (the thinned spacing)."""
    thickness: float = 0.02
    """Standard deviation along the normal, relative to the disc's in-plane one."""
    opacity: float = 0.95
    """Opacity of every disc."""
    views: Optional[Sequence[int]] = None
    """Views whose pixels seed the discs; None = all views of the scene."""


@dataclass
class SurfaceScene:
    """Gaussians on the meshes of a demo scene, their instance ids, and the scene's cameras."""

    means: Tensor  # [N, 3]
    quats: Tensor  # [N, 4] wxyz
    scales: Tensor  # [N, 3] activated
    opacities: Tensor  # [N] activated
    colors: Tensor  # [N, 3] in [0, 1], the constant base colour of each disc's mesh
    instance_ids: Tensor  # [N] int64, 0 = ground
    viewmats: Tensor  # [V, 4, 4] OpenCV world-to-camera
    Ks: Tensor  # [V, 3, 3]
    width: int
    height: int
    gt_instances: Tensor  # [V, H, W] int64, centre-ray instance ids (= the generator's gt_instances)
    train_views: list[int]
    """Indices of the scene's training views (the rest are held-out test views)."""

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]


def surface_scene_from_dir(scene_dir: Path, config: Optional[SurfaceGaussiansConfig] = None) -> SurfaceScene:
    """:func:`surface_scene` of the spec recorded in a generated scene's ``scene.json``."""
    meta = json.loads((Path(scene_dir) / SCENE_FILE).read_text())
    return surface_scene(SceneSpec(**meta["spec"]), config)


def surface_scene(spec: SceneSpec, config: Optional[SurfaceGaussiansConfig] = None) -> SurfaceScene:
    """Discs on the surfaces of the scene ``spec`` generates, seen by its cameras (see module doc)."""
    config = config or SurfaceGaussiansConfig()
    cameras = make_cameras(spec)
    layout = layout_scene(spec, cameras)
    size = spec.image_size
    views = range(spec.num_views) if config.views is None else config.views

    hits, normals, footprints, face_ids = [], [], [], []
    gt = np.zeros((spec.num_views, size, size), dtype=np.int64)  # [V, H, W]
    sampled = np.zeros((size, size), dtype=bool)
    sampled[config.stride // 2 :: config.stride, config.stride // 2 :: config.stride] = True
    for v in range(spec.num_views):
        origins, dirs = cameras.rays(v, np.array([[0.5, 0.5]]))  # [H*W, 3] each
        tri, ray, loc = layout.intersector.intersects_id(origins, dirs, multiple_hits=False, return_locations=True)
        gt[v].reshape(-1)[ray] = layout.face_instance[tri]
        if v not in views:
            continue
        keep = sampled.reshape(-1)[ray]
        tri, ray, loc = tri[keep], ray[keep], loc[keep]
        normal = layout.mesh.face_normals[tri]  # [h, 3]
        normal *= np.where((normal * dirs[ray]).sum(axis=1) > 0.0, -1.0, 1.0)[:, None]  # towards the camera
        depth = ((loc - origins[ray]) * -cameras.camera_to_world[v, :3, 2]).sum(axis=1)  # [h] along the optical axis
        hits.append(loc)
        normals.append(normal)
        footprints.append(depth / cameras.focal * config.stride)
        face_ids.append(tri)
    points, normal = np.concatenate(hits), np.concatenate(normals)
    footprint, face = np.concatenate(footprints), np.concatenate(face_ids)

    first = _thin(points, footprint)
    points, normal, face = points[first], normal[first], face[first]
    voxel = footprint.min() * np.exp2(np.round(np.log2(footprint[first] / footprint.min())))  # [N]

    sigma = config.radius_factor * voxel  # [N]
    instance = layout.face_instance[face]  # [N]
    base = np.array([[0.5, 0.5, 0.5]] + [o.base_color for o in layout.objects])  # [num_objects + 1, 3]
    return SurfaceScene(
        means=torch.from_numpy(points).float(),
        quats=torch.from_numpy(_quats_z_to(normal)).float(),
        scales=torch.from_numpy(np.stack([sigma, sigma, config.thickness * sigma], axis=1)).float(),
        opacities=torch.full((len(points),), config.opacity),
        colors=torch.from_numpy(base[instance]).float(),
        instance_ids=torch.from_numpy(instance).long(),
        viewmats=torch.from_numpy(_opencv_viewmats(cameras.camera_to_world)).float(),
        Ks=torch.tensor([[cameras.focal, 0.0, size / 2.0], [0.0, cameras.focal, size / 2.0], [0.0, 0.0, 1.0]])
        .expand(spec.num_views, 3, 3)
        .clone(),
        width=size,
        height=size,
        gt_instances=torch.from_numpy(gt),
        train_views=[i for i in range(spec.num_views) if i not in spec.test_indices()],
    )


@torch.no_grad()
def render_instance_ids(scene: SurfaceScene, view: int, ids: Optional[Tensor] = None) -> Tensor:
    """Per-pixel id [H, W] int64 rendered with the torch rasterizer: the id whose one-hot colour
    composites highest; 0 where nothing is drawn. ``ids`` [N] defaults to ``scene.instance_ids``."""
    from trace3d_ns.cuda.rasterization import rasterization

    ids = scene.instance_ids if ids is None else ids
    onehot = torch.nn.functional.one_hot(ids, int(ids.max()) + 1).float()  # [N, D]
    render, alpha, _ = rasterization(
        scene.means, scene.quats, scene.scales, scene.opacities, onehot,
        scene.viewmats[view : view + 1], scene.Ks[view : view + 1], scene.width, scene.height,
    )
    drawn = alpha[0, ..., 0] > 0.5  # [H, W]
    return torch.where(drawn, render[0].argmax(dim=-1), torch.zeros_like(drawn, dtype=torch.long))


def _thin(points: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Indices of the kept candidates: footprints are rounded to power-of-two levels of the finest;
    from the finest level up, one candidate per voxel of its level's size is kept, unless a finer
    kept disc already lies in that voxel (a surface gets the finest footprint any view sees it at)."""
    level = np.round(np.log2(footprint / footprint.min())).astype(np.int64)  # [M]
    kept: list[np.ndarray] = []
    for lv in np.unique(level):
        voxel = footprint.min() * 2.0**lv
        idx = np.flatnonzero(level == lv)
        cells = np.floor(points[idx] / voxel).astype(np.int64)  # [m, 3]
        _, first = np.unique(cells, axis=0, return_index=True)
        idx, cells = idx[first], cells[first]
        if kept:
            finer = np.unique(np.floor(points[np.concatenate(kept)] / voxel).astype(np.int64), axis=0)
            taken = _rows_in(cells, finer)
            idx = idx[~taken]
        kept.append(idx)
    return np.sort(np.concatenate(kept))


def _rows_in(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Which int rows [m, 3] occur in ``table`` [t, 3]. [m] bool"""
    both = np.concatenate([table, rows])
    _, inverse = np.unique(both, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    return np.isin(inverse[len(table) :], inverse[: len(table)])


def _opencv_viewmats(camera_to_world: np.ndarray) -> np.ndarray:
    """OpenGL camera-to-world [V, 4, 4] -> OpenCV world-to-camera [V, 4, 4]."""
    return np.linalg.inv(camera_to_world @ OPENGL_TO_OPENCV)


def _quats_z_to(normals: np.ndarray) -> np.ndarray:
    """wxyz quaternions [N, 4] of the shortest rotations taking +z to unit ``normals`` [N, 3]."""
    nx, ny, nz = normals.T
    q = np.stack([1.0 + nz, -ny, nx, np.zeros_like(nz)], axis=1)  # (1 + z.n, z x n)
    flipped = q[:, 0] < 1e-6  # n = -z: any half turn about an axis in the plane
    q[flipped] = [0.0, 1.0, 0.0, 0.0]
    return q / np.linalg.norm(q, axis=1, keepdims=True)
