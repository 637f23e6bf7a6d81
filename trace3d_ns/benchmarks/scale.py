"""Gaussian Instance Tracing at scale: time and peak memory of tracing every view into the store.

Scene (procedural, nothing ray-traced or trained): ``num_gaussians`` flat discs spread evenly
(by area) over a ground square and ``num_objects`` spheres standing on it, sized to the spacing
between discs (a trained 1M-Gaussian scene at 256 px also has several sub-pixel Gaussians per
pixel), seen by ``num_views`` cameras on a ring at ``size`` x ``size`` pixels. Patch maps are
analytic: each pixel's ray is intersected with the spheres and the ground, and the instance it
hits is cut by a ``grid`` x ``grid`` image grid (as in ``trace3d_ns.benchmarks.trace``).

Tracing is :func:`trace3d_ns.git.tracing.trace_model`'s loop, on the CPU: one view at a time, the
per-(Gaussian, patch) sums of ``rendering.patch_weights`` (weight mode; the compiled backend sums
inside its kernel, without listing the view's pairs) or, in count mode, the view's pairs; traced
into the accumulator and dropped; then the store is built. ``backend`` picks the rasterizer as the
model's ``rasterizer`` field does. Memory is the process's resident set: before tracing
its high-water mark is reset (``/proc/self/clear_refs``), so ``peak_rss_bytes`` is the peak while
tracing, and ``peak_over_store = (peak_rss_bytes - baseline_rss_bytes) / store_bytes`` relates what
tracing added over the process before it (Python, torch, the scene) to the store it built: goal
<= 3, i.e. the store plus a few views' working memory, not views x pairs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor

from trace3d_ns.device import release_freed_host_memory
from trace3d_ns.git.tracing import TraceAccumulator, TraceConfig
from trace3d_ns.rendering import contributions, patch_weights, resolve_backend


@dataclass
class ScaleScene:
    """Discs on a ground square and spheres (z up), cameras on a ring, analytic patch maps."""

    means: Tensor  # [N, 3]
    quats: Tensor  # [N, 4] wxyz
    scales: Tensor  # [N, 3]
    opacities: Tensor  # [N]
    viewmats: Tensor  # [V, 4, 4] OpenCV world-to-camera
    Ks: Tensor  # [V, 3, 3]
    size: int
    spheres: np.ndarray  # [K, 4] centre xyz, radius
    ground: float  # half side of the ground square

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.means, self.quats, self.scales, self.opacities))


def make_scene(
    num_gaussians: int, num_views: int, size: int, num_objects: int = 6, seed: int = 0, opacity: float = 0.9
) -> ScaleScene:
    """The benchmark scene (see the module docstring); deterministic for a seed."""
    rng = np.random.default_rng(seed)
    ground = 2.0
    angles = np.arange(num_objects) * 2 * np.pi / max(num_objects, 1)
    radii = rng.uniform(0.3, 0.5, num_objects)
    ring = rng.uniform(0.6, 1.3, num_objects)
    spheres = np.stack([ring * np.cos(angles), ring * np.sin(angles), radii, radii], axis=1)  # [K, 4]
    areas = np.concatenate([[(2 * ground) ** 2], 4 * np.pi * radii**2])
    counts = np.floor(num_gaussians * areas / areas.sum()).astype(np.int64)
    counts[0] += num_gaussians - counts.sum()
    spacing = math.sqrt(areas.sum() / num_gaussians)

    points = [np.concatenate([rng.uniform(-ground, ground, (counts[0], 2)), np.zeros((counts[0], 1))], axis=1)]
    normals = [np.tile([0.0, 0.0, 1.0], (counts[0], 1))]
    for (cx, cy, cz, r), n in zip(spheres, counts[1:]):
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        points.append(np.array([cx, cy, cz]) + r * d)
        normals.append(d)
    means, normal = np.concatenate(points), np.concatenate(normals)
    sigma = 0.6 * spacing
    viewmats, Ks = _ring_cameras(num_views, size)
    return ScaleScene(
        means=torch.from_numpy(means).float(),
        quats=torch.from_numpy(_quats_z_to(normal)).float(),
        scales=torch.tensor([sigma, sigma, 0.1 * sigma]).expand(num_gaussians, 3).clone(),
        opacities=torch.full((num_gaussians,), opacity),
        viewmats=viewmats,
        Ks=Ks,
        size=size,
        spheres=spheres,
        ground=ground,
    )


def _ring_cameras(num_views: int, size: int, radius: float = 4.5, height: float = 2.5, fov_deg: float = 50.0):
    """OpenCV world-to-camera [V, 4, 4] and K [V, 3, 3] on a ring, looking at (0, 0, 0.3)."""
    focal = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    target = np.array([0.0, 0.0, 0.3])
    mats = []
    for i in range(num_views):
        a = 2 * math.pi * i / num_views
        eye = np.array([radius * math.cos(a), radius * math.sin(a), height])
        forward = (target - eye) / np.linalg.norm(target - eye)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        view = np.eye(4)
        view[:3, :3] = np.stack([right, down, forward])
        view[:3, 3] = -view[:3, :3] @ eye
        mats.append(view)
    K = torch.tensor([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])
    return torch.from_numpy(np.stack(mats)).float(), K.expand(num_views, 3, 3).clone()


def _quats_z_to(normals: np.ndarray) -> np.ndarray:
    """wxyz quaternions [N, 4] of the shortest rotations taking +z to unit ``normals`` [N, 3]."""
    nx, ny, nz = normals.T
    q = np.stack([1.0 + nz, -ny, nx, np.zeros_like(nz)], axis=1)
    q[q[:, 0] < 1e-6] = [0.0, 1.0, 0.0, 0.0]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def patch_map(scene: ScaleScene, view: int, grid: int = 7) -> Tensor:
    """Instance hit by each pixel's centre ray (sphere k -> k + 1, ground -> K + 1, nothing -> 0),
    cut by a ``grid`` x ``grid`` image grid into compact patch ids (0 stays 0). [H, W] int32"""
    s = scene.size
    view_np = scene.viewmats[view].double().numpy()
    R, t = view_np[:3, :3], view_np[:3, 3]
    eye = -R.T @ t
    K = scene.Ks[view].double().numpy()
    u, v = np.meshgrid(np.arange(s) + 0.5, np.arange(s) + 0.5)
    cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1)  # [H, W, 3]
    dirs = cam @ R  # world directions (R^T d, row vectors)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    best = np.full((s, s), np.inf)
    ids = np.zeros((s, s), dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_ground = -eye[2] / dirs[..., 2]
        hit = dirs[..., 0] * t_ground + eye[0], dirs[..., 1] * t_ground + eye[1]
        on = (t_ground > 0) & (np.abs(hit[0]) <= scene.ground) & (np.abs(hit[1]) <= scene.ground)
    best[on], ids[on] = t_ground[on], len(scene.spheres) + 1
    for k, (cx, cy, cz, r) in enumerate(scene.spheres):
        oc = eye - np.array([cx, cy, cz])
        b = dirs @ oc
        disc = b * b - (oc @ oc - r * r)
        near = -b - np.sqrt(np.clip(disc, 0.0, None))
        closer = (disc > 0) & (near > 0) & (near < best)
        best[closer], ids[closer] = near[closer], k + 1
    rows = np.arange(s) * grid // s
    cell = rows[:, None] * grid + rows[None, :]
    keyed = np.where(ids > 0, ids * grid * grid + cell + 1, 0)
    _, compact = np.unique(keyed, return_inverse=True)
    compact = compact.reshape(s, s)
    if (keyed == 0).any():  # the smallest key is 0: "no patch" keeps id 0
        return torch.from_numpy(compact).int()
    return torch.from_numpy(compact + 1).int()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _page_size()


def _page_size() -> int:
    import resource

    return resource.getpagesize()


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@torch.no_grad()
def run_scale_benchmark(
    num_gaussians: int = 1_000_000,
    num_views: int = 200,
    size: int = 256,
    grid: int = 7,
    seed: int = 0,
    threads: Optional[int] = None,
    config: Optional[TraceConfig] = None,
    backend: str = "auto",
) -> Dict[str, object]:
    """Trace every view of :func:`make_scene` into the store and measure time and peak memory."""
    backend = resolve_backend(backend, torch.device("cpu"))
    if not Path("/proc/self/status").is_file():
        raise RuntimeError("trace3d-bench scale measures memory through /proc (Linux only)")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        scene = make_scene(num_gaussians, num_views, size, seed=seed)
        maps = [patch_map(scene, v, grid) for v in range(num_views)]
        scene_s = time.perf_counter() - start
        warm = _contributions(scene, 0, backend)  # first-call set-up (compile, allocator, lazy imports) is not tracing
        pairs_view0 = len(warm)
        del warm
        acc = TraceAccumulator(num_gaussians, num_views, config)
        release_freed_host_memory()  # the loop trims between views: the baseline starts trimmed too
        baseline = _rss_bytes()
        reset = _reset_peak_rss()
        sums = acc.config.mode == "weight"
        start = time.perf_counter()
        for v in range(num_views):
            if sums:  # as trace_model does
                acc.add_view_sums(v, *_patch_sums(scene, v, maps[v], backend), int(maps[v].max()) + 1)
            else:
                acc.add_view(v, _contributions(scene, v, backend), maps[v])
            release_freed_host_memory()
        store = acc.build()
        trace_s = time.perf_counter() - start
        peak = _peak_rss_bytes() if reset else None
    finally:
        torch.set_num_threads(previous)
    store_bytes = store.nbytes()
    return {
        "backend": backend,
        "per_view": "per-patch sums" if sums else "pairs",
        "threads": threads or previous,
        "num_gaussians": num_gaussians,
        "num_views": num_views,
        "width": size,
        "height": size,
        "mean_patches_per_view": float(np.mean([int(m.max()) for m in maps])),
        "scene_setup_s": scene_s,
        "trace_s": trace_s,
        "trace_per_view_s": trace_s / num_views,
        "pairs_view0": pairs_view0,
        "observations": store.num_observations,
        "entries": store.num_entries,
        "store_bytes": store_bytes,
        "scene_bytes": scene.nbytes(),
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_over_store": None if peak is None else (peak - baseline) / store_bytes,
        "views_x_pairs_bytes_estimate": pairs_view0 * num_views * (8 + 8 + 4),
        "goal": "peak_over_store <= 3",
    }


def _contributions(scene: ScaleScene, view: int, backend: str):
    return contributions(
        scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats[view], scene.Ks[view],
        scene.size, scene.size, backend=backend,
    )


def _patch_sums(scene: ScaleScene, view: int, patch_map: Tensor, backend: str):
    return patch_weights(
        scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats[view], scene.Ks[view], patch_map,
        backend=backend,
    )
