"""Rasterizer benchmark: torch tile backend vs the brute-force reference, one thread."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict

import torch


def benchmark_scene(num_gaussians: int, seed: int = 0, sh_degree: int = 3):
    """A seeded cloud of small anisotropic Gaussians filling the view of a camera 2.6 units away."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(num_gaussians, 3, generator=g) - 0.5) * 2.0
    quats = torch.randn(num_gaussians, 4, generator=g)
    scales = 0.005 + 0.035 * torch.rand(num_gaussians, 3, generator=g)
    opacities = 0.05 + 0.95 * torch.rand(num_gaussians, generator=g)
    sh = 0.3 * torch.randn(num_gaussians, (sh_degree + 1) ** 2, 3, generator=g)
    return means, quats, scales, opacities, sh


def camera(width: int, height: int, distance: float = 2.6):
    """World-to-camera (OpenCV) looking at the origin from +z, and a 60-degree pinhole K."""
    view = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    view[2, 3] = distance
    f = 0.5 * width / math.tan(math.radians(30.0))
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    return view, K


def _time(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_raster_benchmark(
    num_gaussians: int = 20000, size: int = 128, sh_degree: int = 3, repeats: int = 3, reference_repeats: int = 1
) -> Dict[str, float]:
    from trace3d_ns.cuda.rasterization import rasterization
    from trace3d_ns.cuda.reference import reference_rasterize
    from trace3d_ns.rendering import contributions

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = [p.requires_grad_(True) for p in benchmark_scene(num_gaussians, sh_degree=sh_degree)]
        view, K = camera(size, size)

        def tiled() -> None:
            rgb, alpha, _ = rasterization(*params, view[None], K[None], size, size, sh_degree=sh_degree)
            (rgb.sum() + alpha.sum()).backward()

        def brute() -> None:
            rgb, alpha, _, _ = reference_rasterize(*params, view, K, size, size, sh_degree=sh_degree)
            (rgb.sum() + alpha.sum()).backward()

        tiled()  # warm-up
        tiled_s = _time(tiled, repeats)
        brute_s = _time(brute, reference_repeats)
        with torch.no_grad():
            m, q, s, o, _ = (p.detach() for p in params)
            n_pairs = len(contributions(m, q, s, o, view, K, size, size))
            contrib_s = _time(lambda: contributions(m, q, s, o, view, K, size, size), repeats)
            rgb, alpha, _ = rasterization(m, q, s, o, params[4].detach(), view[None], K[None], size, size, sh_degree=sh_degree)
    finally:
        torch.set_num_threads(threads)
    return {
        "num_gaussians": num_gaussians,
        "width": size,
        "height": size,
        "sh_degree": sh_degree,
        "threads": 1,
        "mean_alpha": float(alpha.mean()),
        "tiled_fwd_bwd_s": tiled_s,
        "bruteforce_fwd_bwd_s": brute_s,
        "speedup_vs_bruteforce": brute_s / tiled_s,
        "contributions": n_pairs,
        "contributions_s": contrib_s,
        "contributions_per_s": n_pairs / contrib_s,
    }
