"""Gaussian Instance Tracing benchmark: speed of a trace pass against a forward render, and memory
of the sparse store against the dense N x T x L float32 weight matrix of the paper.

Scene: the perfect-geometry surface Gaussians of a generated demo scene
(:mod:`trace3d_ns.git.surface_gaussians`; 100 views at 256 px with stride 2 give about 170k
Gaussians). Patch maps: each view's ground-truth instance map cut by a fixed 7 x 7 image grid, so
every view has about 70 patches (``grid**2`` cells, more where instances cut them) and far more
patch boundaries than SAM's patches give (a pessimistic case for the sparse store: boundary
Gaussians need two entries). The dense baseline is sized with ``dense_patches`` (64) patches per
view, less than the views actually have.
"""

from __future__ import annotations

import time
from typing import Callable, Dict

import torch

from trace3d_ns.git.surface_gaussians import SurfaceGaussiansConfig, SurfaceScene, surface_scene
from trace3d_ns.git.tracing import TraceAccumulator, TraceConfig
from trace3d_ns.rendering import contributions, rasterize, resolve_backend
from trace3d_ns.scene.generate import SceneSpec


def grid_patch_map(instances: torch.Tensor, grid: int) -> torch.Tensor:
    """Instance map [H, W] cut by a ``grid`` x ``grid`` image grid -> compact patch ids [H, W] int32
    (1.. in first-occurrence-independent sorted order; no patch 0)."""
    h, w = instances.shape
    rows = torch.arange(h) * grid // h
    cols = torch.arange(w) * grid // w
    cell = rows[:, None] * grid + cols[None, :]  # [H, W]
    _, ids = torch.unique(instances.long() * grid * grid + cell, return_inverse=True)
    return (ids + 1).int()


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs (as ``timeit``: the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def run_trace_benchmark(
    num_views: int = 100,
    image_size: int = 256,
    stride: int = 2,
    grid: int = 7,
    dense_patches: int = 64,
    sh_degree: int = 3,
    repeats: int = 5,
    seed: int = 0,
    config: TraceConfig | None = None,
) -> Dict[str, float]:
    """Time one view's trace pass (contributions + scatter-add into the store) against one forward
    render (``rasterize``, no grad, SH colours of ``sh_degree``) of the same view on the same backend
    (the device of the scene: CPU here), then trace all views and size the store.

    Returns ``trace_over_forward`` (goal <= 1) and ``sparse_over_dense`` (goal <= 0.01) with the
    numbers behind them.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = SceneSpec(num_views=num_views, image_size=image_size, seed=seed)
        scene = surface_scene(spec, SurfaceGaussiansConfig(stride=stride))
        n = scene.num_gaussians
        sh = 0.3 * torch.randn(n, (sh_degree + 1) ** 2, 3, generator=torch.Generator().manual_seed(seed))
        patch_maps = [grid_patch_map(scene.gt_instances[v], grid) for v in range(num_views)]

        view = num_views // 2
        acc = TraceAccumulator(n, num_views, config)

        def forward() -> None:
            rasterize(
                scene.means, scene.quats, scene.scales, scene.opacities, sh, scene.viewmats[view : view + 1],
                scene.Ks[view : view + 1], scene.width, scene.height, sh_degree=sh_degree,
            )

        def trace() -> None:
            acc.add_view(view, _contributions(scene, view), patch_maps[view])

        forward(), trace()  # warm-up
        forward_s = _best_time(forward, repeats)
        trace_s = _best_time(trace, repeats)
        pairs = _contributions(scene, view)
        scatter_s = _best_time(lambda: acc.add_view(view, pairs, patch_maps[view]), repeats)

        acc = TraceAccumulator(n, num_views, config)
        start = time.perf_counter()
        for v in range(num_views):
            acc.add_view(v, _contributions(scene, v), patch_maps[v])
        all_views_s = time.perf_counter() - start
        start = time.perf_counter()
        store = acc.build()
        build_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    dense_bytes = 4 * n * dense_patches * num_views
    return {
        "backend": resolve_backend("auto", torch.device("cpu")),
        "threads": 1,
        "num_gaussians": n,
        "num_views": num_views,
        "width": scene.width,
        "height": scene.height,
        "mean_patches_per_view": sum(int(p.max()) for p in patch_maps) / num_views,
        "pairs_in_timed_view": len(pairs),
        "forward_s": forward_s,
        "trace_s": trace_s,
        "scatter_add_s": scatter_s,
        "trace_over_forward": trace_s / forward_s,
        "trace_all_views_s": all_views_s,
        "build_store_s": build_s,
        "observations": store.num_observations,
        "entries": store.num_entries,
        "observations_per_gaussian_view": store.num_observations / (n * num_views),
        "entries_per_observation": store.num_entries / max(store.num_observations, 1),
        "sparse_bytes": store.nbytes(),
        "dense_bytes": dense_bytes,
        "dense_patches": dense_patches,
        "sparse_over_dense": store.nbytes() / dense_bytes,
    }


def _contributions(scene: SurfaceScene, view: int):
    return contributions(
        scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats[view], scene.Ks[view],
        scene.width, scene.height,
    )
