"""Cluttered layouts (``trace3d-scene --clutter``): objects that touch, stack and lean on each other,
some sharing a texture that runs across their contact, some with thin parts.

The layout is built in four passes, every draw from one random generator:

1. **Ground objects**: a tall box at the origin, then boxes, cylinders, spheres, cones and tori, each
   pushed against a random earlier one until the two footprints touch (a 1 mm gap). A box next to a
   box is turned to the same yaw and pushed along a face normal with probability ``ALIGN_P``, so the
   two share a face.
2. **Thin objects**: tables (a thin top on four legs of 1.6-2.2 cm radius) and lamps (base, a thin
   pole, a shade), pushed against ground objects the same way.
3. **Stacked objects** on the tops of boxes and tables, inside the top and clear of each other.
4. **Leaning** planks and rods against a side of a box: the lower end on the ground, the upper edge
   touching the side below its top.

Footprints are the convex hulls of the meshes' ground projections (exact for the convex parts
used); two footprints overlap when they are not separated along one of their edge normals
(separating-axis test). Where two boxes share a face, a box stands on a box or a plank leans on a
box, the pair may share one texture in one frame (the first such contact always does, later ones with
``SHARE_P``): its pattern runs on across the contact, the hardest boundary for a segmenter.

Every object also records the part of each face (a table's top and legs, a lamp's base, pole and
shade), from which the SAM-like masks take their part-level masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import trimesh
from scipy.spatial import ConvexHull

from trace3d_ns.scene.objects import SceneObject, Texture, primitive, random_texture, yaw_matrix

ALIGN_P = 0.7
"""A box placed against a box turns to its yaw and shares a face with this probability."""
SHARE_P = 0.4
"""A face-sharing, stacking or leaning contact after the first shares a texture with this probability."""
GROUND_SCALE = 0.9
"""Size factor of the ground primitives (of the sparse layout's sizes)."""
STACK_SCALE = 0.6
"""Size factor of the stacked primitives before they are shrunk to fit their support."""
CONTACT_GAP = 1e-3
"""Gap left between touching footprints (world units; ~0.06 px at 160 px)."""
PLACEMENT_TRIES = 40
LEAN_ELEVATION_DEG = (58.0, 76.0)
"""Angle of a leaning plank or rod above the ground."""
MIN_LEAN_LENGTH = 0.22
OTHER_GROUND_SHAPES = ("sphere", "cylinder", "cone", "torus")


def clutter_radius(num_objects: int) -> float:
    """Radius of the disc that holds every footprint (the cameras frame it)."""
    return 0.2 + 0.16 * math.sqrt(num_objects)


def role_counts(num_objects: int) -> dict[str, int]:
    """How many objects of each role: about a fifth each thin, stacked and leaning, the rest on the ground."""
    k = int(round(0.2 * num_objects))
    thin = k if num_objects >= 5 else 0
    counts = {"thin": thin, "stacked": k, "leaning": k}
    counts["ground"] = num_objects - sum(counts.values())
    return counts


# ---- 2D geometry --------------------------------------------------------------------------------
def hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of 2D points [P, 2], counter-clockwise. [K, 2]"""
    return points[ConvexHull(points).vertices]


def overlap(a: np.ndarray, b: np.ndarray, tol: float = 1e-6) -> bool:
    """Whether two convex polygons [K, 2] overlap by more than ``tol`` (touching does not count)."""
    for poly in (a, b):
        edges = np.roll(poly, -1, axis=0) - poly  # [K, 2]
        normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1)  # [K, 2]
        pa, pb = a @ normals.T, b @ normals.T  # [Ka, K], [Kb, K]
        separated = (pa.max(axis=0) <= pb.min(axis=0) + tol * np.linalg.norm(normals, axis=1)) | (
            pb.max(axis=0) <= pa.min(axis=0) + tol * np.linalg.norm(normals, axis=1)
        )
        if separated.any():
            return False
    return True


def inside(poly: np.ndarray, container: np.ndarray, margin: float = 0.0) -> bool:
    """Whether every vertex of ``poly`` lies in the counter-clockwise convex ``container``, at least
    ``margin`` from its edges."""
    edges = np.roll(container, -1, axis=0) - container  # [K, 2]
    rel = poly[:, None, :] - container[None]  # [P, K, 2]
    cross = edges[None, :, 0] * rel[..., 1] - edges[None, :, 1] * rel[..., 0]  # [P, K]
    return bool((cross >= margin * np.linalg.norm(edges, axis=1)[None]).all())


# ---- meshes -------------------------------------------------------------------------------------
def _box_mesh(ex: float, ey: float, ez: float) -> trimesh.Trimesh:
    """Box standing on z = 0, footprint centred on the origin."""
    return trimesh.creation.box(extents=(ex, ey, ez)).apply_translation([0.0, 0.0, ez / 2.0])


def _with_parts(parts: list[trimesh.Trimesh], ids: list[int]) -> tuple[trimesh.Trimesh, np.ndarray]:
    """One mesh of several parts and the part index of each of its faces [F]."""
    face_part = np.concatenate([np.full(len(p.faces), i, dtype=np.int64) for p, i in zip(parts, ids)])
    return trimesh.util.concatenate(parts), face_part


def table_mesh(rng: np.random.Generator) -> tuple[trimesh.Trimesh, dict[str, float], np.ndarray]:
    """A table: a 3 cm top on four thin legs (parts: top 0, legs 1-4)."""
    w, d, h = rng.uniform(0.36, 0.55), rng.uniform(0.3, 0.42), rng.uniform(0.3, 0.42)
    t, r, inset = 0.03, rng.uniform(0.016, 0.022), 0.03
    parts = [trimesh.creation.box(extents=(w, d, t)).apply_translation([0.0, 0.0, h - t / 2.0])]
    for sx in (-1, 1):
        for sy in (-1, 1):
            leg = trimesh.creation.cylinder(radius=r, height=h - t, sections=12)
            parts.append(leg.apply_translation([sx * (w / 2 - inset - r), sy * (d / 2 - inset - r), (h - t) / 2.0]))
    mesh, face_part = _with_parts(parts, [0, 1, 2, 3, 4])
    return mesh, {"width": w, "depth": d, "height": h, "top_thickness": t, "leg_radius": r}, face_part


def lamp_mesh(rng: np.random.Generator) -> tuple[trimesh.Trimesh, dict[str, float], np.ndarray]:
    """A lamp: a flat base, a thin pole and a cone or ball shade (parts: base 0, pole 1, shade 2)."""
    rb, hb = rng.uniform(0.08, 0.11), 0.03
    rp, hp = rng.uniform(0.014, 0.02), rng.uniform(0.4, 0.6)
    base = trimesh.creation.cylinder(radius=rb, height=hb, sections=32).apply_translation([0.0, 0.0, hb / 2.0])
    pole = trimesh.creation.cylinder(radius=rp, height=hp, sections=12).apply_translation([0.0, 0.0, hb + hp / 2.0])
    top = hb + hp
    params = {"base_radius": rb, "pole_radius": rp, "pole_height": hp}
    if rng.random() < 0.5:
        params["shade_radius"], params["shade_height"] = rng.uniform(0.1, 0.14), rng.uniform(0.12, 0.18)
        shade = trimesh.creation.cone(radius=params["shade_radius"], height=params["shade_height"], sections=32)
        shade.apply_translation([0.0, 0.0, top - 0.02])
    else:
        params["shade_radius"] = rng.uniform(0.06, 0.09)
        shade = trimesh.creation.icosphere(subdivisions=2, radius=params["shade_radius"])
        shade.apply_translation([0.0, 0.0, top + 0.5 * params["shade_radius"]])
    mesh, face_part = _with_parts([base, pole, shade], [0, 1, 2])
    return mesh, params, face_part


def _long_item(kind: str, length: float, width: float) -> trimesh.Trimesh:
    """A plank (3 cm thick, ``width`` wide) or a rod (radius ``width``) along +Z, centred on the origin."""
    if kind == "plank":
        return trimesh.creation.box(extents=(0.03, width, length))
    return trimesh.creation.cylinder(radius=width, height=length, sections=16)


def _placed_mesh(local: trimesh.Trimesh, yaw: float, xy: np.ndarray, z: float) -> trimesh.Trimesh:
    """``local`` turned by ``yaw`` about +Z and moved to (x, y, z)."""
    transform = np.eye(4)
    transform[:3, :3] = yaw_matrix(yaw)
    transform[:3, 3] = [xy[0], xy[1], z]
    return local.copy().apply_transform(transform)


# ---- layout -------------------------------------------------------------------------------------
@dataclass
class _Item:
    """An object being placed: its footprint on what it stands on, and its box (for faces and tops)."""

    obj: SceneObject
    footprint: np.ndarray  # [K, 2] world, counter-clockwise
    on_ground: bool
    box: tuple[float, float, float] | None = None  # (ex, ey, ez) when it is an axis-aligned box in its frame


@dataclass
class _Support:
    """A horizontal top things can stand on."""

    owner: int  # index into the items
    top: np.ndarray  # [4, 2] world, counter-clockwise
    z: float
    yaw: float
    half: tuple[float, float]
    occupants: list[np.ndarray] = field(default_factory=list)


@dataclass
class ClutterBuilder:
    """Places the objects of one cluttered layout (see the module docstring)."""

    rng: np.random.Generator
    hues: np.ndarray  # [N]
    radius: float
    items: list[_Item] = field(default_factory=list)
    supports: list[_Support] = field(default_factory=list)
    contacts: list[tuple[int, int, str]] = field(default_factory=list)
    shared: list[tuple[int, int]] = field(default_factory=list)

    # ---- bookkeeping
    def _new_object(self, shape, params, mesh, yaw, xy, z, role, face_part=None) -> SceneObject:
        instance_id = len(self.items) + 1
        position = np.array([xy[0], xy[1], z])
        texture = random_texture(float(self.hues[instance_id - 1]), self.rng, position, yaw)
        return SceneObject(instance_id, shape, params, position, float(yaw), texture, mesh, face_part, role)

    def _ground_footprints(self, skip: int | None = None) -> list[np.ndarray]:
        return [it.footprint for k, it in enumerate(self.items) if it.on_ground and k != skip]

    def _fits(self, footprint: np.ndarray, skip: int | None = None) -> bool:
        """Clear of every ground footprint (except ``skip``), and all of them together still inside a
        square of side 2 * radius (the layout is centred at the end)."""
        others = self._ground_footprints(skip)
        points = np.concatenate([footprint, *others])  # [P, 2]
        if (points.max(axis=0) - points.min(axis=0)).max() > 2.0 * self.radius:
            return False
        return not any(overlap(footprint, other) for other in others)

    def _contact(self, a: int, b: int, kind: str, may_share: bool) -> None:
        """Record that item ``a`` touches item ``b``; ``a`` may take ``b``'s texture."""
        self.contacts.append((self.items[a].obj.instance_id, self.items[b].obj.instance_id, kind))
        if may_share and (not self.shared or self.rng.random() < SHARE_P):
            self.items[a].obj.texture = self.items[b].obj.texture
            self.shared.append((self.items[a].obj.instance_id, self.items[b].obj.instance_id))

    def _add(self, item: _Item) -> int:
        self.items.append(item)
        if item.box is not None:
            self._add_support(len(self.items) - 1, item.box, item.obj.yaw, item.obj.position)
        return len(self.items) - 1

    def _add_support(self, owner: int, box: tuple[float, float, float], yaw: float, position: np.ndarray) -> None:
        hx, hy = box[0] / 2.0, box[1] / 2.0
        corners = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]]) @ yaw_matrix(yaw)[:2, :2].T + position[:2]
        self.supports.append(_Support(owner, corners, float(position[2] + box[2]), yaw, (hx, hy)))

    # ---- passes
    def place_touching(self, shape: str, local: trimesh.Trimesh, params: dict, role: str,
                       face_part: np.ndarray | None = None, box: tuple | None = None) -> int | None:
        """Push a ground-standing object against a random earlier ground object (or put the first at
        the origin); its index, or None if it found no room."""
        ground = [k for k, it in enumerate(self.items) if it.on_ground]
        local_fp = hull(local.vertices[:, :2])  # [K, 2]
        for _ in range(PLACEMENT_TRIES):
            yaw = float(self.rng.uniform(0.0, 2.0 * math.pi))
            if not ground:
                xy, anchor = np.zeros(2), None
            else:
                anchor = ground[int(self.rng.integers(len(ground)))]
                other = self.items[anchor]
                centre = other.obj.position[:2]
                if box is not None and other.box is not None and self.rng.random() < ALIGN_P:
                    k = int(self.rng.integers(4))
                    yaw = other.obj.yaw + k * math.pi / 2.0
                    face = int(self.rng.integers(4))
                    angle = other.obj.yaw + face * math.pi / 2.0
                    along = other.box[1 - face % 2] / 2.0  # half length of that face
                    slide = self.rng.uniform(-0.5, 0.5) * along
                else:
                    angle, slide = float(self.rng.uniform(0.0, 2.0 * math.pi)), 0.0
                direction = np.array([math.cos(angle), math.sin(angle)])
                tangent = np.array([-direction[1], direction[0]])
                fp = local_fp @ yaw_matrix(yaw)[:2, :2].T
                xy = self._push(fp, other.footprint, centre + slide * tangent, direction)
            footprint = local_fp @ yaw_matrix(yaw)[:2, :2].T + xy
            if not self._fits(footprint):
                continue
            mesh = _placed_mesh(local, yaw, xy, 0.0)
            obj = self._new_object(shape, params, mesh, yaw, xy, 0.0, role, face_part)
            index = self._add(_Item(obj, footprint, True, box))
            if anchor is not None:
                aligned = box is not None and self.items[anchor].box is not None and _aligned(yaw, self.items[anchor].obj.yaw)
                self._contact(index, anchor, "side", may_share=aligned)
            return index
        return None

    @staticmethod
    def _push(fp: np.ndarray, anchor_fp: np.ndarray, start: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """Centre on the ray ``start + t * direction`` where ``fp`` (centred at 0) just stops overlapping
        ``anchor_fp`` (bisection on t; the overlap is one interval because both are convex)."""
        lo, hi = 0.0, 4.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if overlap(fp + start + mid * direction, anchor_fp):
                lo = mid
            else:
                hi = mid
        return start + (hi + CONTACT_GAP) * direction

    def place_stacked(self) -> int | None:
        """A smaller primitive on a box or table top, inside it and clear of what already stands there
        (the tops are tried in random order)."""
        usable = [s for s in self.supports if min(s.half) >= 0.09]
        shapes = ("box",) + OTHER_GROUND_SHAPES
        shape = shapes[int(self.rng.integers(len(shapes)))]
        local, params = primitive(shape, self.rng, STACK_SCALE)
        for k in self.rng.permutation(len(usable)):
            placed = self._stack_on(usable[k], shape, local, params)
            if placed is not None:
                return placed
        return None

    def _stack_on(self, support: _Support, shape: str, local: trimesh.Trimesh, params: dict) -> int | None:
        """Put ``local`` on ``support`` (shrinking it up to 3 times by 0.75 to fit); its index or None."""
        base = self.items[support.owner]
        aligned = shape == "box" and self.rng.random() < ALIGN_P
        yaw = support.yaw + int(self.rng.integers(4)) * math.pi / 2.0 if aligned else float(self.rng.uniform(0, 2 * math.pi))
        scale = 1.0
        for _ in range(4):
            local_fp = hull(local.vertices[:, :2]) @ yaw_matrix(yaw)[:2, :2].T
            for _ in range(PLACEMENT_TRIES // 4):
                uv = self.rng.uniform(-0.8, 0.8, 2) * np.array(support.half)
                xy = uv @ yaw_matrix(support.yaw)[:2, :2].T + support.top.mean(axis=0)
                footprint = local_fp + xy
                if inside(footprint, support.top, 0.005) and not any(overlap(footprint, o) for o in support.occupants):
                    mesh = _placed_mesh(local, yaw, xy, support.z)
                    params = {**params, "scale": scale}
                    obj = self._new_object(shape, params, mesh, yaw, xy, support.z, "stacked")
                    obj.notes["rests_on"] = base.obj.instance_id
                    box = tuple(params[k] * 1.0 for k in ("extent_x", "extent_y", "extent_z")) if shape == "box" else None
                    support.occupants.append(footprint)
                    index = self._add(_Item(obj, footprint, False, box))
                    self._contact(index, support.owner, "stack", may_share=shape == "box" and base.box is not None)
                    return index
            local = local.copy().apply_scale(0.75)
            params = {k: v * 0.75 for k, v in params.items()}
            scale *= 0.75
        return None

    def place_leaning(self) -> int | None:
        """A plank or rod against a side of a ground box: lower end on the ground, upper edge touching
        the side below the box's top."""
        boxes = [k for k, it in enumerate(self.items) if it.on_ground and it.box is not None and it.box[2] >= 0.28]
        if not boxes:
            return None
        kind = "plank" if self.rng.random() < 0.6 else "rod"
        width = self.rng.uniform(0.12, 0.22) if kind == "plank" else self.rng.uniform(0.018, 0.028)
        elevation = math.radians(self.rng.uniform(*LEAN_ELEVATION_DEG))
        for _ in range(PLACEMENT_TRIES):
            anchor = boxes[int(self.rng.integers(len(boxes)))]
            base = self.items[anchor]
            face = int(self.rng.integers(4))
            angle = base.obj.yaw + face * math.pi / 2.0
            normal = np.array([math.cos(angle), math.sin(angle)])
            tangent = np.array([-normal[1], normal[0]])
            depth, along, height = base.box[face % 2] / 2.0, base.box[1 - face % 2] / 2.0, base.box[2]
            item_width = 0.03 if kind == "rod" else width
            if along < item_width / 2.0 + 0.02:
                continue
            length = min(self.rng.uniform(0.45, 0.8), 0.92 * height / math.sin(elevation))
            local = None
            while length >= MIN_LEAN_LENGTH:
                local = _long_item(kind, length, width)
                local.apply_transform(trimesh.transformations.rotation_matrix(-(math.pi / 2 - elevation), [0, 1, 0]))
                v = local.vertices
                local.apply_translation([-v[:, 0].min(), 0.0, -v[:, 2].min()])  # touches x = 0 and the ground
                contact = local.vertices[local.vertices[:, 0] < 1e-6, 2].max()
                if contact <= 0.95 * height:
                    break
                length *= 0.85
                local = None
            if local is None:
                continue
            slide = self.rng.uniform(-1.0, 1.0) * (along - item_width / 2.0 - 0.01)
            frame = np.eye(4)
            frame[:2, 0], frame[:2, 1] = normal, tangent
            frame[:2, 3] = base.obj.position[:2] + depth * normal + slide * tangent
            mesh = local.apply_transform(frame)
            footprint = hull(mesh.vertices[:, :2])
            if not self._fits(footprint, skip=anchor):
                continue
            params = {"length": float(length), ("width" if kind == "plank" else "radius"): float(width),
                      "elevation_deg": math.degrees(elevation)}
            xy = footprint.mean(axis=0)
            obj = self._new_object(kind, params, mesh, angle, xy, 0.0, "leaning")
            obj.notes["leans_on"] = base.obj.instance_id
            index = self._add(_Item(obj, footprint, True))
            self._contact(index, anchor, "lean", may_share=kind == "plank")
            return index
        return None


def _aligned(a: float, b: float) -> bool:
    """Whether two yaws differ by a multiple of 90 degrees."""
    k = (a - b) / (math.pi / 2.0)
    return abs(k - round(k)) < 1e-9


def sample_clutter(num_objects: int, rng: np.random.Generator, radius: float) -> ClutterBuilder | None:
    """Place ``num_objects`` cluttered objects (see the module docstring); None if one found no room."""
    counts = role_counts(num_objects)
    hues = (rng.uniform() + np.arange(num_objects) / num_objects)[rng.permutation(num_objects)] % 1.0
    builder = ClutterBuilder(rng, hues, radius)
    for k in range(counts["ground"]):
        if k == 0 or rng.random() < 0.5:
            ex, ey = rng.uniform(0.28, 0.5, 2) * (1.2 if k == 0 else GROUND_SCALE)
            ez = rng.uniform(0.4, 0.6) if k == 0 else rng.uniform(0.15, 0.55)
            params = {"extent_x": float(ex), "extent_y": float(ey), "extent_z": float(ez)}
            placed = builder.place_touching("box", _box_mesh(ex, ey, ez), params, "ground", box=(ex, ey, ez))
        else:
            shape = OTHER_GROUND_SHAPES[int(rng.integers(len(OTHER_GROUND_SHAPES)))]
            local, params = primitive(shape, rng, GROUND_SCALE)
            placed = builder.place_touching(shape, local, params, "ground")
        if placed is None:
            return None
    for k in range(counts["thin"]):
        shape = "table" if k % 2 == 0 else "lamp"
        local, params, face_part = (table_mesh if shape == "table" else lamp_mesh)(rng)
        placed = builder.place_touching(shape, local, params, "thin", face_part)
        if placed is None:
            return None
        if shape == "table":
            obj = builder.items[placed].obj
            top = (params["width"], params["depth"], params["height"])
            builder._add_support(placed, top, obj.yaw, obj.position)
    for _ in range(counts["stacked"]):
        if builder.place_stacked() is None:
            return None
    for _ in range(counts["leaning"]):
        if builder.place_leaning() is None:
            return None
    _recentre(builder)
    return builder


def _recentre(builder: ClutterBuilder) -> None:
    """Move everything so the footprints' bounding box is centred on the origin."""
    points = np.concatenate([it.footprint for it in builder.items])  # [P, 2]
    shift = -(points.min(axis=0) + points.max(axis=0)) / 2.0
    offset = np.array([shift[0], shift[1], 0.0])
    textures: dict[int, Texture] = {}
    for it in builder.items:
        it.obj.mesh.apply_translation(offset)
        it.obj.position = it.obj.position + offset
        it.footprint = it.footprint + shift
        textures[id(it.obj.texture)] = it.obj.texture
    for texture in textures.values():
        texture.origin = texture.origin + offset
    for support in builder.supports:
        support.top = support.top + shift
