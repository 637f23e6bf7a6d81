"""Procedural demo scene for Trace3D: textured primitives on a ground plane, ray cast with embree.

The generator writes a nerfstudio-format dataset (``images/``, ``transforms.json``, ``sparse_pc.ply``),
per-pixel ground-truth instance ids (``gt_instances/``), every object ray cast alone on the test views
(``gt_amodal/<object id>/<image name>``: the object's full silhouette, nothing hidden by other
objects, for scoring 3D extraction), metadata (``scene.json``) and optionally masks that imitate SAM's
cross-view inconsistency (``sam_masks/``).  Rendering is an independent CPU ray caster (trimesh +
embreex), so the data never depends on the Gaussian rasterizers under test.

Two layouts: sparse (primitives on the ground, about half touching a neighbour) and cluttered
(``SceneSpec.clutter``, :mod:`.clutter`: objects that touch, stack and lean on each other, shared
textures across contacts, thin parts).

World frame: +Z up, ground plane at z = 0.  Cameras follow the nerfstudio/OpenGL convention
(camera-to-world matrices, the camera looks down its -Z axis with +Y up).  Every output is a
deterministic function of the :class:`SceneSpec`.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image
from scipy import ndimage
from trimesh.ray.ray_pyembree import RayMeshIntersector

from trace3d_ns.scene.clutter import clutter_radius, sample_clutter
from trace3d_ns.scene.objects import (
    GROUND_CELL,
    SHAPES,
    Ground,
    SceneObject,
    primitive,
    random_ground,
    random_sun,
    random_texture,
    to_uint8,
)

GENERATOR_NAME = "trace3d_ns.scene"
GENERATOR_VERSION = 2

IMAGE_DIR = "images"
GT_DIR = "gt_instances"
AMODAL_DIR = "gt_amodal"
SAM_DIR = "sam_masks"
TRANSFORMS_FILE = "transforms.json"
PLY_FILE = "sparse_pc.ply"
SCENE_FILE = "scene.json"
OUTPUT_NAMES = (IMAGE_DIR, GT_DIR, AMODAL_DIR, SAM_DIR, TRANSFORMS_FILE, PLY_FILE, SCENE_FILE)

# Inclusive (min, max) bounds of the integer SceneSpec fields; None = unbounded.
LIMITS: dict[str, tuple[int, int | None]] = {
    "num_objects": (1, 24),
    "num_views": (2, None),
    "image_size": (16, 4096),
    "seed": (0, None),
    "test_every": (2, None),
    "num_points": (1, None),
    "supersample": (1, 4),
}

FOV_DEG = 50.0
ELEVATION_RANGE_DEG = (15.0, 55.0)
LOOK_AT_HEIGHT = 0.2
AMBIENT = 0.35
SHADOW_EPS = 1e-4
TOUCH_PROBABILITY = 0.5
MAX_TOUCH_GAP = 0.05
PLACEMENT_TRIES = 300
MAX_LAYOUT_ATTEMPTS = 50
VISIBILITY_CHECK_SIZE = 48
MIN_VISIBLE_PIXELS = 3
MIN_VISIBLE_VIEW_FRACTION = 0.25
SMOOTH_ANGLE_DEG = 40.0
SKY_HORIZON = np.array([0.86, 0.90, 0.95])
SKY_ZENITH = np.array([0.47, 0.63, 0.86])
SHARED_TEXTURE_MERGE_P = 0.6
"""SAM-like masks merge two touching objects that share a texture with this probability (other
image-adjacent pairs: ``p_merge``): a pattern running across a contact hides the boundary."""

# Independent random streams derived from the seed.
_STREAM_LAYOUT, _STREAM_CAMERAS, _STREAM_POINTS, _STREAM_SAM = 1, 2, 3, 4


@dataclass
class SceneSpec:
    """What to generate; every output is a deterministic function of these fields."""

    num_objects: int = 5
    num_views: int = 40
    image_size: int = 128
    seed: int = 0
    test_every: int = 8
    """Every ``test_every``-th view (index % test_every == 0) is held out as a test view."""
    num_points: int = 5000
    """Size of the seed point cloud (fewer if the train views see fewer surface pixels)."""
    sam_like_masks: bool = False
    supersample: int = 2
    """Anti-aliasing: ``supersample**2`` rays per pixel for RGB; instance ids use the centre ray."""
    clutter: bool = False
    """Cluttered layout (:mod:`.clutter`; meant for 8-12 objects): objects touch, stack and lean on
    each other, some share a texture across their contact, tables and lamps have thin parts."""

    def validate(self) -> None:
        """Raise ``ValueError`` if a field is out of range."""
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low or (high is not None and value > high):
                bound = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{name} must be an integer {bound}, got {value!r}")

    def test_indices(self) -> list[int]:
        """Indices of the held-out test views."""
        return [i for i in range(self.num_views) if i % self.test_every == 0]


@dataclass
class SceneLayout:
    """All geometry of a scene plus what the shader needs per face."""

    objects: list[SceneObject]
    ground: Ground
    light_dir: np.ndarray  # [3] unit vector towards the sun
    contacts: list[tuple[int, int, str]] = field(default_factory=list)
    """(object id, id of the object it was placed against, side / stack / lean) of a cluttered layout."""
    shared_textures: list[tuple[int, int]] = field(default_factory=list)
    """Pairs of touching objects with one texture that runs across their contact."""

    @cached_property
    def mesh(self) -> trimesh.Trimesh:
        """Ground and objects in one mesh; faces ordered ground first, then objects by id."""
        parts = [self.ground.mesh()] + [o.mesh for o in self.objects]
        offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
        vertices = np.concatenate([p.vertices for p in parts])
        faces = np.concatenate([p.faces + off for p, off in zip(parts, offsets)])
        return trimesh.Trimesh(vertices, faces, process=False)

    @cached_property
    def face_instance(self) -> np.ndarray:
        """Instance id of every face of :attr:`mesh` [F] (0 = ground)."""
        ids = [0] + [o.instance_id for o in self.objects]
        counts = [2] + [len(o.mesh.faces) for o in self.objects]
        return np.repeat(np.array(ids, dtype=np.int64), counts)

    @cached_property
    def face_part(self) -> np.ndarray:
        """Part index within its object of every face of :attr:`mesh` [F] (0 for the ground)."""
        return np.concatenate([np.zeros(2, dtype=np.int64)] + [o.parts() for o in self.objects])

    @cached_property
    def object_intersectors(self) -> list[RayMeshIntersector]:
        """One embree intersector per object (in :attr:`objects` order), for casting it alone."""
        return [RayMeshIntersector(o.mesh) for o in self.objects]

    @cached_property
    def corner_normals(self) -> np.ndarray:
        """Shading normals at the three corners of every face [F, 3, 3] (smooth below a crease angle)."""
        ground = np.tile(np.array([0.0, 0.0, 1.0]), (2, 3, 1))  # [2, 3, 3]
        return np.concatenate([ground] + [_corner_normals(o.mesh) for o in self.objects])

    @cached_property
    def intersector(self) -> RayMeshIntersector:
        """Embree ray intersector over :attr:`mesh`."""
        return RayMeshIntersector(self.mesh)


@dataclass
class Cameras:
    """Pinhole cameras sharing intrinsics."""

    camera_to_world: np.ndarray  # [K, 4, 4] OpenGL convention
    focal: float  # pixels, at ``size``
    size: int

    def at_size(self, size: int) -> Cameras:
        """Same poses with intrinsics rescaled to a ``size`` x ``size`` image."""
        return Cameras(self.camera_to_world, self.focal * size / self.size, size)

    def rays(self, view: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rays of one view through sub-pixel ``offsets`` [O, 2] (x, y in [0, 1)).

        Returns origins and unit directions, both [O * size * size, 3], sample-major then row-major.
        """
        pix = np.arange(self.size, dtype=np.float64)
        u = pix[None, None, :] + offsets[:, 0, None, None]  # [O, 1, S]
        v = pix[None, :, None] + offsets[:, 1, None, None]  # [O, S, 1]
        half = self.size / 2.0
        x = np.broadcast_to((u - half) / self.focal, (len(offsets), self.size, self.size))  # [O, S, S]
        y = np.broadcast_to(-(v - half) / self.focal, x.shape)  # [O, S, S]
        d_cam = np.stack([x, y, -np.ones_like(x)], axis=-1).reshape(-1, 3)  # [R, 3]
        c2w = self.camera_to_world[view]
        dirs = d_cam @ c2w[:3, :3].T
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        return np.broadcast_to(c2w[:3, 3], dirs.shape).copy(), dirs


@dataclass
class RenderedView:
    """Centre-ray buffers of one view plus the anti-aliased image."""

    rgb: np.ndarray  # [S, S, 3] uint8, anti-aliased
    instances: np.ndarray  # [S, S] uint16, 0 = ground / sky
    points: np.ndarray  # [S, S, 3] world hit points of the centre rays, NaN for sky
    parts: np.ndarray  # [S, S] int64 part of the hit object (0 for ground / sky)


# ----------------------------------------------------------------------------------------------
# Public API


def generate_scene(out_dir: Path, spec: SceneSpec, overwrite: bool = False) -> Path:
    """Generate the scene described by ``spec`` and write it to ``out_dir``.

    ``out_dir`` may be missing, empty or a previously generated scene (whose outputs are replaced).
    Any other non-empty directory is refused with ``FileExistsError`` unless ``overwrite``; even then
    only the generator's own output names are removed before writing.
    """
    spec.validate()
    out_dir = Path(out_dir)
    _prepare_output_dir(out_dir, overwrite)
    cameras = make_cameras(spec)
    layout = layout_scene(spec, cameras)
    views = [render_view(layout, cameras, i, spec.supersample) for i in range(spec.num_views)]
    names = [f"frame_{i:05d}.png" for i in range(spec.num_views)]
    test = spec.test_indices()

    (out_dir / IMAGE_DIR).mkdir(parents=True)
    (out_dir / GT_DIR).mkdir()
    for name, view in zip(names, views):
        Image.fromarray(view.rgb).save(out_dir / IMAGE_DIR / name)
        Image.fromarray(view.instances).save(out_dir / GT_DIR / name)
    in_frame = write_amodal(out_dir / AMODAL_DIR, layout, cameras, {i: names[i] for i in test})
    if spec.sam_like_masks:
        (out_dir / SAM_DIR).mkdir()
        merge_bias = {tuple(sorted(pair)): SHARED_TEXTURE_MERGE_P for pair in layout.shared_textures}
        for i, (name, view) in enumerate(zip(names, views)):
            rng = np.random.default_rng([spec.seed, _STREAM_SAM, i])
            parts = view.parts if spec.clutter else None
            masks = make_sam_like_masks(view.instances, rng, points=view.points, parts=parts, merge_bias=merge_bias)
            np.save(out_dir / SAM_DIR / f"{Path(name).stem}.npy", masks)

    train_views = [v for i, v in enumerate(views) if i not in test]
    xyz, rgb = sample_seed_points(train_views, spec.num_points, np.random.default_rng([spec.seed, _STREAM_POINTS]))
    _write_ply(out_dir / PLY_FILE, xyz, rgb)
    _write_json(out_dir / TRANSFORMS_FILE, _transforms_json(cameras, names, test))
    _write_json(out_dir / SCENE_FILE, _scene_json(spec, layout, views, names, test, in_frame))
    return out_dir


def make_cameras(spec: SceneSpec) -> Cameras:
    """Cameras on a jittered ring around the scene at varied elevations, looking at its centre."""
    rng = np.random.default_rng([spec.seed, _STREAM_CAMERAS])
    k = spec.num_views
    radius = clutter_radius(spec.num_objects) if spec.clutter else _layout_radius(spec.num_objects)
    distance = 1.9 * (radius + 0.4)
    azimuth = (np.arange(k) + rng.uniform(-0.3, 0.3, k)) * (2.0 * math.pi / k) + rng.uniform(0.0, 2.0 * math.pi)
    elevation = np.radians(rng.uniform(*ELEVATION_RANGE_DEG, k))
    radius = distance * rng.uniform(0.92, 1.08, k)
    eyes = radius[:, None] * np.stack(
        [np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)], axis=1
    )  # [K, 3]
    targets = np.concatenate([rng.normal(0.0, 0.05, (k, 2)), np.full((k, 1), LOOK_AT_HEIGHT)], axis=1)  # [K, 3]
    c2w = np.stack([_look_at(e, t) for e, t in zip(eyes, targets)])
    focal = 0.5 * spec.image_size / math.tan(math.radians(FOV_DEG) / 2.0)
    return Cameras(c2w, focal, spec.image_size)


def layout_scene(spec: SceneSpec, cameras: Cameras) -> SceneLayout:
    """Sample object shapes, textures and positions until every object is visible in enough views.

    Raises ``RuntimeError`` if no acceptable layout is found within ``MAX_LAYOUT_ATTEMPTS``.
    """
    rng = np.random.default_rng([spec.seed, _STREAM_LAYOUT])
    check = cameras.at_size(min(spec.image_size, VISIBILITY_CHECK_SIZE))
    needed = max(1, math.ceil(MIN_VISIBLE_VIEW_FRACTION * spec.num_views))
    ground_half_size = 2.0 * float(np.abs(cameras.camera_to_world[:, :2, 3]).max())
    sample = _sample_clutter_layout if spec.clutter else _sample_layout
    for _ in range(MAX_LAYOUT_ATTEMPTS):
        layout = sample(spec.num_objects, rng, ground_half_size)
        if layout is None:
            continue
        counts = np.stack([_instance_counts(layout, check, i, spec.num_objects) for i in range(spec.num_views)])
        if ((counts[:, 1:] >= MIN_VISIBLE_PIXELS).sum(axis=0) >= needed).all():
            return layout
    raise RuntimeError(f"no layout with every object visible after {MAX_LAYOUT_ATTEMPTS} attempts")


def render_view(layout: SceneLayout, cameras: Cameras, view: int, supersample: int) -> RenderedView:
    """Ray cast one view: ``supersample**2`` shaded rays per pixel for RGB, the centre ray for ids."""
    s, size = supersample, cameras.size
    grid = (np.arange(s) + 0.5) / s
    offsets = np.stack(np.meshgrid(grid, grid, indexing="xy"), axis=-1).reshape(-1, 2)  # [s*s, 2]
    if s % 2 == 0:
        offsets = np.concatenate([offsets, [[0.5, 0.5]]])
    centre = int(np.flatnonzero((offsets == 0.5).all(axis=1))[0])
    origins, dirs = cameras.rays(view, offsets)
    face, points = _trace(layout, origins, dirs)
    shaded = slice(0, s * s * size * size)
    colour = _shade(layout, face[shaded], points[shaded], dirs[shaded]).reshape(s * s, size, size, 3)
    face = face.reshape(len(offsets), size, size)[centre]  # [S, S]
    return RenderedView(
        rgb=to_uint8(colour.mean(axis=0)),
        instances=np.where(face >= 0, layout.face_instance[face], 0).astype(np.uint16),
        points=points.reshape(len(offsets), size, size, 3)[centre],
        parts=np.where(face >= 0, layout.face_part[face], 0),
    )


def render_amodal(layout: SceneLayout, cameras: Cameras, view: int) -> np.ndarray:
    """Every object ray cast alone (the other objects and the ground removed) with the centre rays
    that make ``gt_instances``, so each visible mask lies inside its object's amodal one.
    [N, S, S] bool, in :attr:`SceneLayout.objects` order."""
    origins, dirs = cameras.rays(view, np.array([[0.5, 0.5]]))
    return np.stack(
        [hit.intersects_any(origins, dirs).reshape(cameras.size, cameras.size) for hit in layout.object_intersectors]
    )


def write_amodal(folder: Path, layout: SceneLayout, cameras: Cameras, views: dict[int, str]) -> dict[int, list[int]]:
    """``folder/<object id>/<image name>`` (8-bit, 255 = the object alone covers the pixel) for every
    object and each of ``views`` (index -> image name). Returns, per object id, the views where it is
    in frame (its amodal mask is not empty)."""
    in_frame: dict[int, list[int]] = {o.instance_id: [] for o in layout.objects}
    for o in layout.objects:
        (folder / str(o.instance_id)).mkdir(parents=True, exist_ok=True)
    for view, name in views.items():
        for o, mask in zip(layout.objects, render_amodal(layout, cameras, view)):
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / str(o.instance_id) / name)
            if mask.any():
                in_frame[o.instance_id].append(view)
    return in_frame


def sample_seed_points(
    views: list[RenderedView], num_points: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample up to ``num_points`` visible surface points with the colour of their pixel.

    Returns xyz [P, 3] float32 and rgb [P, 3] uint8, drawn uniformly over the surface pixels of ``views``.
    """
    xyz = np.concatenate([v.points.reshape(-1, 3) for v in views])  # [N, 3]
    rgb = np.concatenate([v.rgb.reshape(-1, 3) for v in views])  # [N, 3]
    hit = np.isfinite(xyz).all(axis=1)
    xyz, rgb = xyz[hit], rgb[hit]
    pick = np.sort(rng.choice(len(xyz), size=min(num_points, len(xyz)), replace=False))
    return xyz[pick].astype(np.float32), rgb[pick]


def make_sam_like_masks(
    gt_instances: np.ndarray,
    rng: np.random.Generator,
    *,
    points: np.ndarray | None = None,
    parts: np.ndarray | None = None,
    merge_bias: dict[tuple[int, int], float] | None = None,
    p_merge: float = 0.25,
    p_split: float = 0.3,
    p_keep_whole: float = 0.5,
    p_jitter: float = 0.5,
    max_jitter_px: int = 2,
    p_drop_small: float = 0.6,
    small_area_fraction: float = 0.004,
    p_ground: float = 0.7,
    max_ground_regions: int = 3,
    min_mask_pixels: int = 4,
) -> np.ndarray:
    """Imitate SAM's automatic masks for one view, inconsistently across views.

    Starting from the ground-truth instances [H, W] (0 = background), randomly: drop objects smaller
    than ``small_area_fraction`` of the image (``p_drop_small``); merge image-adjacent object pairs
    (``p_merge`` per pair, or ``merge_bias[(a, b)]`` for ids a < b); split objects (``p_split``) into
    their parts if ``parts`` [H, W] (part index of each pixel's object) shows several, else in two by
    a random plane through their centroid, in 3D if ``points`` [H, W, 3] (world hit points, NaN = sky)
    is given, else in the image plane, also emitting the whole object with ``p_keep_whole``
    (overlapping granularities);
    dilate or erode each mask by up to ``max_jitter_px`` pixels (``p_jitter``); add up to
    ``max_ground_regions`` large background regions (``p_ground``).  Masks smaller than
    ``min_mask_pixels`` are dropped and the rest shuffled, so mask order carries no instance id.

    Returns a bool array [K, H, W]; K may be 0.  Raises ``ValueError`` for out-of-range arguments.
    """
    probabilities = {"p_merge": p_merge, "p_split": p_split, "p_keep_whole": p_keep_whole}
    probabilities |= {"p_jitter": p_jitter, "p_drop_small": p_drop_small, "p_ground": p_ground}
    outside = [name for name, p in probabilities.items() if not 0.0 <= p <= 1.0]
    if outside or max_jitter_px < 1 or max_ground_regions < 1:
        raise ValueError(f"probabilities must be in [0, 1] (bad: {outside}); max_jitter_px, max_ground_regions >= 1")
    height, width = gt_instances.shape
    coords = _split_coordinates(gt_instances.shape, points)  # [H, W, D]
    ids = [int(i) for i in np.unique(gt_instances) if i != 0]
    small = small_area_fraction * height * width
    ids = [i for i in ids if (gt_instances == i).sum() >= small or rng.random() >= p_drop_small]

    masks: list[np.ndarray] = []  # each [H, W] bool
    for group in _merge_neighbours(gt_instances, ids, rng, p_merge, merge_bias or {}):
        whole = np.isin(gt_instances, group)  # [H, W]
        pieces = []
        if len(group) == 1 and rng.random() < p_split:
            part_ids = np.unique(parts[whole]) if parts is not None else []
            if len(part_ids) > 1:
                pieces = [whole & (parts == k) for k in part_ids]
            else:
                pieces = _split_by_plane(whole, coords, rng)
        masks.extend(pieces)
        if not pieces or rng.random() < p_keep_whole:
            masks.append(whole)
    if rng.random() < p_ground:
        masks.extend(_ground_regions(gt_instances, coords, rng, max_ground_regions))
    masks = [_jitter(m, rng, max_jitter_px) if rng.random() < p_jitter else m for m in masks]
    masks = [m for m in masks if m.sum() >= min_mask_pixels]
    order = rng.permutation(len(masks))
    return np.stack([masks[i] for i in order]) if masks else np.zeros((0, height, width), dtype=bool)


# ----------------------------------------------------------------------------------------------
# Layout


def _layout_radius(num_objects: int) -> float:
    """Radius of the disc holding the object footprint centres."""
    return 0.35 + 0.38 * math.sqrt(num_objects)


def _sample_clutter_layout(num_objects: int, rng: np.random.Generator, ground_half_size: float) -> SceneLayout | None:
    """A cluttered layout (:mod:`.clutter`); None if an object found no room."""
    built = sample_clutter(num_objects, rng, clutter_radius(num_objects))
    if built is None:
        return None
    objects = [item.obj for item in built.items]
    ground = random_ground(rng, ground_half_size)
    return SceneLayout(objects, ground, random_sun(rng), built.contacts, built.shared)


def _sample_layout(num_objects: int, rng: np.random.Generator, ground_half_size: float) -> SceneLayout | None:
    """Sample shapes, colours, textures and non-overlapping positions; None if placement failed."""
    shapes = [SHAPES[i % len(SHAPES)] for i in rng.permutation(max(num_objects, len(SHAPES)))][:num_objects]
    local = [primitive(shape, rng) for shape in shapes]
    yaws = rng.uniform(0.0, 2.0 * math.pi, num_objects)
    footprints = [float(np.linalg.norm(m.vertices[:, :2], axis=1).max()) for m, _ in local]
    positions = _place_footprints(footprints, rng, _layout_radius(num_objects))
    if positions is None:
        return None
    hues = (rng.uniform() + np.arange(num_objects) / num_objects)[rng.permutation(num_objects)] % 1.0
    objects = []
    for i, ((mesh, params), yaw, pos, hue) in enumerate(zip(local, yaws, positions, hues)):
        position = np.array([pos[0], pos[1], 0.0])
        transform = trimesh.transformations.rotation_matrix(yaw, [0.0, 0.0, 1.0])
        transform[:2, 3] = pos
        texture = random_texture(float(hue), rng, position, float(yaw))
        objects.append(
            SceneObject(
                instance_id=i + 1,
                shape=shapes[i],
                params=params,
                position=position,
                yaw=float(yaw),
                texture=texture,
                mesh=mesh.copy().apply_transform(transform),
            )
        )
    ground = random_ground(rng, ground_half_size)
    return SceneLayout(objects, ground, random_sun(rng))


def _place_footprints(radii: list[float], rng: np.random.Generator, disc: float) -> np.ndarray | None:
    """Non-overlapping footprint centres [N, 2] inside a disc, about half touching a previous one."""
    placed: list[np.ndarray] = []
    for r in radii:
        for _ in range(PLACEMENT_TRIES):
            if placed and rng.random() < TOUCH_PROBABILITY:
                j = int(rng.integers(len(placed)))
                angle = rng.uniform(0.0, 2.0 * math.pi)
                dist = r + radii[j] + rng.uniform(0.0, MAX_TOUCH_GAP)
                candidate = placed[j] + dist * np.array([math.cos(angle), math.sin(angle)])
            else:
                angle, rho = rng.uniform(0.0, 2.0 * math.pi), disc * math.sqrt(rng.uniform())
                candidate = rho * np.array([math.cos(angle), math.sin(angle)])
            clear = all(np.linalg.norm(candidate - p) >= r + radii[k] for k, p in enumerate(placed))
            if clear and np.linalg.norm(candidate) <= disc:
                placed.append(candidate)
                break
        else:
            return None
    return np.array(placed)


def _corner_normals(mesh: trimesh.Trimesh) -> np.ndarray:
    """Per-corner shading normals [F, 3, 3]: mean of adjacent face normals within the crease angle."""
    face_normals = mesh.face_normals  # [F, 3]
    adjacent = mesh.vertex_faces[mesh.faces]  # [F, 3, D] face ids, -1 padded
    neighbour = face_normals[adjacent]  # [F, 3, D, 3]
    similar = np.einsum("fk,fcdk->fcd", face_normals, neighbour) > math.cos(math.radians(SMOOTH_ANGLE_DEG))
    summed = (neighbour * (similar & (adjacent >= 0))[..., None]).sum(axis=2)  # [F, 3, 3]
    return summed / np.linalg.norm(summed, axis=-1, keepdims=True)


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world [4, 4] (OpenGL: looks down -Z, +Y up) at ``eye`` looking at ``target``."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, eye
    return c2w


# ----------------------------------------------------------------------------------------------
# Rendering


def _instance_counts(layout: SceneLayout, cameras: Cameras, view: int, num_objects: int) -> np.ndarray:
    """Pixel count per instance id [N + 1] of one view (centre rays only)."""
    origins, dirs = cameras.rays(view, np.array([[0.5, 0.5]]))
    face = layout.intersector.intersects_first(origins, dirs)  # [R]
    ids = np.where(face >= 0, layout.face_instance[face], 0)
    return np.bincount(ids, minlength=num_objects + 1)


def _trace(layout: SceneLayout, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First hits of rays [R, 3]: face index [R] (-1 = miss) and world point [R, 3] (NaN = miss)."""
    tri, ray, loc = layout.intersector.intersects_id(origins, dirs, multiple_hits=False, return_locations=True)
    face = np.full(len(origins), -1, dtype=np.int64)
    points = np.full((len(origins), 3), np.nan)
    face[ray], points[ray] = tri, loc
    return face, points


def _shade(layout: SceneLayout, face: np.ndarray, points: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Lambertian + ambient colour with cast shadows [R, 3] in [0, 1]; sky gradient for misses."""
    colour = np.empty_like(dirs)
    colour[face < 0] = _sky(dirs[face < 0])
    hit = np.flatnonzero(face >= 0)
    f, p = face[hit], points[hit]
    bary = trimesh.triangles.points_to_barycentric(layout.mesh.triangles[f], p)  # [h, 3]
    normal = np.einsum("hc,hck->hk", bary, layout.corner_normals[f])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    facing = np.where((np.einsum("hk,hk->h", normal, dirs[hit]) > 0.0)[:, None], -1.0, 1.0)  # [h, 1]
    normal *= facing
    geometric = layout.mesh.face_normals[f] * facing
    lambert = np.clip(normal @ layout.light_dir, 0.0, None)  # [h]
    lit = np.flatnonzero(lambert > 0.0)
    origins = p[lit] + SHADOW_EPS * geometric[lit]
    blocked = layout.intersector.intersects_any(origins, np.broadcast_to(layout.light_dir, origins.shape))
    lambert[lit[blocked]] = 0.0
    colour[hit] = _albedo(layout, layout.face_instance[f], p) * (AMBIENT + (1.0 - AMBIENT) * lambert)[:, None]
    return colour


def _albedo(layout: SceneLayout, instance: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Albedo [R, 3] of surface points [R, 3] belonging to instances [R]."""
    albedo = np.empty_like(points)
    ground = instance == 0
    albedo[ground] = layout.ground.albedo(points[ground])
    for obj in layout.objects:
        sel = instance == obj.instance_id
        albedo[sel] = obj.albedo(points[sel])
    return albedo


def _sky(dirs: np.ndarray) -> np.ndarray:
    """Vertical sky gradient [R, 3] for ray directions [R, 3]."""
    t = np.clip(dirs[:, 2], 0.0, 1.0)[:, None]
    return SKY_HORIZON * (1.0 - t) + SKY_ZENITH * t


# ----------------------------------------------------------------------------------------------
# SAM-like masks


def _split_coordinates(shape: tuple[int, int], points: np.ndarray | None) -> np.ndarray:
    """Coordinates used for plane splits and ground regions: world points or pixel (x, y) [H, W, D]."""
    if points is not None:
        return points
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.stack([cols, rows], axis=-1).astype(np.float64)


def _merge_neighbours(
    gt: np.ndarray, ids: list[int], rng: np.random.Generator, p_merge: float, bias: dict[tuple[int, int], float]
) -> list[list[int]]:
    """Group ids: each image-adjacent pair (a < b) is merged with ``bias.get((a, b), p_merge)`` (an id
    joins at most one pair)."""
    grown = {i: ndimage.binary_dilation(gt == i, iterations=2) for i in ids}  # each [H, W]
    pairs = [(a, b) for k, a in enumerate(ids) for b in ids[k + 1 :] if (grown[a] & (gt == b)).any()]
    merged: set[int] = set()
    groups = []
    for k in rng.permutation(len(pairs)):
        a, b = pairs[k]
        if a not in merged and b not in merged and rng.random() < bias.get((a, b), p_merge):
            merged.update((a, b))
            groups.append([a, b])
    return groups + [[i] for i in ids if i not in merged]


def _split_by_plane(mask: np.ndarray, coords: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``mask`` [H, W] by a random plane near its centroid in ``coords``; [] if a part is tiny."""
    inside = coords[mask]  # [n, D]
    normal = rng.normal(size=coords.shape[-1])
    side = (inside - inside.mean(axis=0)) @ normal  # [n]
    side -= rng.uniform(-0.3, 0.3) * side.std()
    parts = []
    for keep in (side > 0.0, side <= 0.0):
        part = np.zeros_like(mask)
        part[mask] = keep
        parts.append(part)
    return parts if min(p.sum() for p in parts) >= 0.15 * mask.sum() else []


def _ground_regions(
    gt: np.ndarray, coords: np.ndarray, rng: np.random.Generator, max_regions: int
) -> list[np.ndarray]:
    """Partition the background (gt == 0, finite coords) into up to ``max_regions`` Voronoi cells."""
    background = (gt == 0) & np.isfinite(coords).all(axis=-1)  # [H, W]
    pixels = coords[background]  # [n, D]
    if len(pixels) == 0:
        return []
    count = int(rng.integers(1, max_regions + 1))
    seeds = pixels[rng.choice(len(pixels), size=min(count, len(pixels)), replace=False)]  # [c, D]
    nearest = np.argmin(((pixels[:, None, :] - seeds[None]) ** 2).sum(axis=-1), axis=1)  # [n]
    regions = []
    for c in range(len(seeds)):
        region = np.zeros_like(background)
        region[background] = nearest == c
        regions.append(region)
    return regions


def _jitter(mask: np.ndarray, rng: np.random.Generator, max_px: int) -> np.ndarray:
    """Dilate or erode ``mask`` [H, W] by 1..``max_px`` pixels."""
    steps = int(rng.integers(1, max_px + 1))
    op = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
    return op(mask, iterations=steps)


# ----------------------------------------------------------------------------------------------
# Output files


def is_generated_scene(out_dir: Path) -> bool:
    """True if ``out_dir`` holds a ``scene.json`` written by this generator."""
    try:
        meta = json.loads((Path(out_dir) / SCENE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR_NAME


def _prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir`` or clear the generator's previous outputs from it (see :func:`generate_scene`)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (overwrite or is_generated_scene(out_dir)):
        raise FileExistsError(f"{out_dir} is not empty and not a generated scene (pass --overwrite / overwrite=True)")
    for name in OUTPUT_NAMES:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """Binary little-endian PLY with ``x y z`` float32 and ``red green blue`` uint8 vertices."""
    vertex = np.empty(len(xyz), dtype=[(a, "<f4") for a in "xyz"] + [(c, "u1") for c in ("red", "green", "blue")])
    for k, a in enumerate("xyz"):
        vertex[a] = xyz[:, k]
    for k, c in enumerate(("red", "green", "blue")):
        vertex[c] = rgb[:, k]
    header = "\n".join(
        ["ply", "format binary_little_endian 1.0", f"element vertex {len(xyz)}"]
        + [f"property float {a}" for a in "xyz"]
        + [f"property uchar {c}" for c in ("red", "green", "blue")]
        + ["end_header", ""]
    )
    path.write_bytes(header.encode("ascii") + vertex.tobytes())


def _write_json(path: Path, data: dict) -> None:
    """Pretty-printed JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def _transforms_json(cameras: Cameras, names: list[str], test: list[int]) -> dict:
    """nerfstudio-data ``transforms.json`` with explicit train/val/test file lists (val = test)."""
    paths = [f"{IMAGE_DIR}/{n}" for n in names]
    held_out = [paths[i] for i in test]
    return {
        "camera_model": "OPENCV",
        "fl_x": cameras.focal,
        "fl_y": cameras.focal,
        "cx": cameras.size / 2.0,
        "cy": cameras.size / 2.0,
        "w": cameras.size,
        "h": cameras.size,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": [
            {"file_path": p, "transform_matrix": c2w.tolist()} for p, c2w in zip(paths, cameras.camera_to_world)
        ],
        "ply_file_path": PLY_FILE,
        "train_filenames": [p for i, p in enumerate(paths) if i not in test],
        "val_filenames": held_out,
        "test_filenames": held_out,
    }


def _scene_json(
    spec: SceneSpec,
    layout: SceneLayout,
    views: list[RenderedView],
    names: list[str],
    test: list[int],
    in_frame: dict[int, list[int]],
) -> dict:
    """Metadata: spec, objects with per-object visibility, contacts, ground, light and split."""
    counts = np.stack([np.bincount(v.instances.ravel(), minlength=spec.num_objects + 1) for v in views])  # [K, N+1]
    objects = []
    for obj in layout.objects:
        entry = obj.metadata()
        entry["visible_views"] = [int(i) for i in np.flatnonzero(counts[:, obj.instance_id] > 0)]
        entry["in_frame_test_views"] = in_frame[obj.instance_id]
        objects.append(entry)
    return {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "seed": spec.seed,
        "spec": asdict(spec),
        "up_axis": "+z",
        "ground": {"id": 0, "z": 0.0, "half_size": layout.ground.half_size, "cell_size": GROUND_CELL},
        "light_direction": layout.light_dir.tolist(),
        "objects": objects,
        "image_dir": IMAGE_DIR,
        "gt_instances_dir": GT_DIR,
        "gt_amodal_dir": AMODAL_DIR,
        "contacts": [{"object": a, "against": b, "kind": k} for a, b, k in layout.contacts],
        "shared_textures": [list(pair) for pair in layout.shared_textures],
        "sam_masks_dir": SAM_DIR if spec.sam_like_masks else None,
        "file_names": names,
        "test_views": test,
        "train_views": [i for i in range(spec.num_views) if i not in test],
    }
