"""Objects of the procedural scenes: textured meshes on a checkered ground (world frame: +Z up,
ground at z = 0). Shared by the sparse layout of :mod:`.generate` and the cluttered one of
:mod:`.clutter`.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np
import trimesh

SHAPES = ("box", "sphere", "cylinder", "cone", "torus")
PATTERNS = ("stripes", "checks", "rings")
GROUND_CELL = 0.25
GROUND_TONES = np.array([[0.64, 0.61, 0.55], [0.43, 0.43, 0.41]])  # [2, 3] light / dark checker


def to_uint8(colour: np.ndarray) -> np.ndarray:
    """Float colours in [0, 1] -> uint8."""
    return np.round(np.clip(colour, 0.0, 1.0) * 255.0).astype(np.uint8)


def yaw_matrix(yaw: float) -> np.ndarray:
    """Rotation about +Z by ``yaw`` (object -> world). [3, 3]"""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class Texture:
    """A two-tone procedural pattern fixed in a frame (``origin``, ``yaw``). Two objects with the same
    texture (frame included) show one pattern that runs on across their contact."""

    base_color: np.ndarray  # [3] in [0, 1]
    accent_color: np.ndarray  # [3] in [0, 1]
    pattern: str
    axis: np.ndarray  # [3] unit vector in the texture frame
    frequency: float  # pattern periods per world unit
    origin: np.ndarray  # [3] world position of the texture frame
    yaw: float

    def albedo(self, points: np.ndarray) -> np.ndarray:
        """Albedo [R, 3] at world surface points [R, 3]."""
        local = (points - self.origin) @ yaw_matrix(self.yaw) * self.frequency  # [R, 3]
        if self.pattern == "stripes":
            phase = np.floor(local @ self.axis)  # [R]
        elif self.pattern == "checks":
            phase = np.floor(local).sum(axis=1)  # [R]
        else:  # rings around the axis
            radial = local - np.outer(local @ self.axis, self.axis)  # [R, 3]
            phase = np.floor(np.linalg.norm(radial, axis=1))  # [R]
        accent = (phase % 2.0)[:, None]  # [R, 1]
        return self.base_color * (1.0 - accent) + self.accent_color * accent


def random_texture(hue: float, rng: np.random.Generator, origin: np.ndarray, yaw: float) -> Texture:
    """A saturated colour of ``hue`` with a pale or dark accent, a random pattern, axis and frequency."""
    base, accent = object_colours(hue, rng)
    axis = rng.normal(size=3)
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    frequency = float(rng.uniform(5.0, 10.0))
    return Texture(base, accent, pattern, axis / np.linalg.norm(axis), frequency, np.asarray(origin, float), float(yaw))


def object_colours(hue: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Saturated base colour of ``hue`` and a pale or dark accent of the same hue."""
    sat, val = rng.uniform(0.55, 0.85), rng.uniform(0.7, 0.92)
    base = np.array(colorsys.hsv_to_rgb(hue, sat, val))
    pale = rng.random() < 0.5
    if pale:
        accent = colorsys.hsv_to_rgb(hue, sat * 0.3, min(1.0, val * 1.1))
    else:
        accent = colorsys.hsv_to_rgb(hue, sat, val * 0.45)
    return base, np.array(accent)


@dataclass
class SceneObject:
    """One textured object (a primitive or a few parts) in the world frame."""

    instance_id: int
    shape: str
    params: dict[str, float]
    position: np.ndarray  # [3] centre of the footprint, at the height the object stands on
    yaw: float
    texture: Texture
    mesh: trimesh.Trimesh  # world frame
    face_part: np.ndarray | None = None
    """[F] part index of every face (0 .. parts - 1), None = one part."""
    role: str = "ground"
    """How it is placed: ground (stands on the ground), stacked, leaning, thin (has thin parts)."""
    notes: dict = field(default_factory=dict)
    """Extra JSON-serialisable placement facts for ``scene.json`` (what it rests on or leans against)."""

    def albedo(self, points: np.ndarray) -> np.ndarray:
        """Procedural albedo [R, 3] at world surface points [R, 3]."""
        return self.texture.albedo(points)

    @property
    def base_color(self) -> np.ndarray:
        """The texture's base colour [3] in [0, 1]."""
        return self.texture.base_color

    @property
    def accent_color(self) -> np.ndarray:
        """The texture's accent colour [3] in [0, 1]."""
        return self.texture.accent_color

    def parts(self) -> np.ndarray:
        """Part index of every face. [F] int64"""
        if self.face_part is None:
            return np.zeros(len(self.mesh.faces), dtype=np.int64)
        return self.face_part

    def metadata(self) -> dict:
        """JSON-serialisable description for ``scene.json``."""
        lo, hi = self.mesh.bounds
        return {
            "id": self.instance_id,
            "shape": self.shape,
            "params": self.params,
            "position": self.position.tolist(),
            "yaw": self.yaw,
            "color": to_uint8(self.texture.base_color).tolist(),
            "accent_color": to_uint8(self.texture.accent_color).tolist(),
            "pattern": self.texture.pattern,
            "bbox_min": lo.tolist(),
            "bbox_max": hi.tolist(),
            "role": self.role,
            "num_parts": int(self.parts().max()) + 1,
            **self.notes,
        }


@dataclass
class Ground:
    """Square checkered ground plane at z = 0 with low-frequency brightness variation."""

    half_size: float
    waves: np.ndarray  # [W, 4] rows (kx, ky, phase, amplitude) of the brightness noise

    def mesh(self) -> trimesh.Trimesh:
        """Two triangles facing +Z."""
        g = self.half_size
        vertices = np.array([[-g, -g, 0.0], [g, -g, 0.0], [g, g, 0.0], [-g, g, 0.0]])
        return trimesh.Trimesh(vertices, np.array([[0, 1, 2], [0, 2, 3]]), process=False)

    def albedo(self, points: np.ndarray) -> np.ndarray:
        """Procedural albedo [R, 3] at ground points [R, 3]."""
        cells = np.floor(points[:, :2] / GROUND_CELL).sum(axis=1) % 2.0  # [R]
        tone = GROUND_TONES[cells.astype(np.int64)]  # [R, 3]
        kx, ky, phase, amp = self.waves.T  # each [W]
        noise = (amp * np.sin(np.outer(points[:, 0], kx) + np.outer(points[:, 1], ky) + phase)).sum(axis=1)
        return tone * (1.0 + noise)[:, None]


def random_ground(rng: np.random.Generator, half_size: float) -> Ground:
    """The ground's brightness waves."""
    waves = np.column_stack(
        [rng.normal(0.0, 1.5, (4, 2)), rng.uniform(0.0, 2.0 * math.pi, 4), np.full(4, 0.05)]
    )  # [4, 4]
    return Ground(half_size, waves)


def random_sun(rng: np.random.Generator) -> np.ndarray:
    """Unit vector towards the sun, 40-65 degrees above the horizon. [3]"""
    azimuth, elevation = rng.uniform(0.0, 2.0 * math.pi), math.radians(rng.uniform(40.0, 65.0))
    horizontal = math.cos(elevation)
    return np.array([horizontal * math.cos(azimuth), horizontal * math.sin(azimuth), math.sin(elevation)])


def primitive(shape: str, rng: np.random.Generator, scale: float = 1.0) -> tuple[trimesh.Trimesh, dict[str, float]]:
    """A primitive resting on z = 0 with its footprint centred on the origin, and its dimensions
    (sizes multiplied by ``scale``; the random draws do not depend on it)."""
    size = float(rng.uniform(0.16, 0.34)) * scale
    if shape == "box":
        ex = (size * rng.uniform(1.0, 1.8), size * rng.uniform(1.0, 1.8), size * rng.uniform(0.8, 2.2))
        params = {"extent_x": ex[0], "extent_y": ex[1], "extent_z": ex[2]}
        mesh, lift = trimesh.creation.box(extents=ex), ex[2] / 2.0
    elif shape == "sphere":
        params = {"radius": size * rng.uniform(0.9, 1.3)}
        mesh, lift = trimesh.creation.icosphere(subdivisions=3, radius=params["radius"]), params["radius"]
    elif shape == "cylinder":
        params = {"radius": size * rng.uniform(0.7, 1.1), "height": size * rng.uniform(1.2, 3.0)}
        mesh = trimesh.creation.cylinder(radius=params["radius"], height=params["height"], sections=32)
        lift = params["height"] / 2.0
    elif shape == "cone":
        params = {"radius": size * rng.uniform(0.9, 1.3), "height": size * rng.uniform(1.5, 3.0)}
        mesh, lift = trimesh.creation.cone(radius=params["radius"], height=params["height"], sections=32), 0.0
    elif shape == "torus":
        major = size * rng.uniform(1.1, 1.5)
        params = {"major_radius": major, "minor_radius": major * rng.uniform(0.3, 0.45)}
        mesh = trimesh.creation.torus(major, params["minor_radius"], major_sections=48, minor_sections=16)
        lift = params["minor_radius"]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mesh.apply_translation([0.0, 0.0, lift])
    return mesh, {k: float(v) for k, v in params.items()}
