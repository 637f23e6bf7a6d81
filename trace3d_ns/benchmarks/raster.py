"""Rasterizer benchmark: the compiled and torch backends and the brute-force reference.

Forward + backward of one 20k-Gaussian SH-3 view at 128 px, one thread each; the compiled backend
also with two threads, and its first-call compile time measured in a fresh process with an empty
numba cache (then with the cache filled). The two backends (and the thread counts) are timed in turn,
so that the machine's drift does not enter their ratios."""

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


def _time_in_turn(fns: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Median seconds of each function, taking them in turn (round robin) so that the machine's
    drift over the run hits every one alike and their ratios hold. Each timed call follows an
    untimed one of the same function: the caches hold its own data, as when it runs alone, not
    what the previous function left."""
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_raster_benchmark(
    num_gaussians: int = 20000, size: int = 128, sh_degree: int = 3, repeats: int = 5, reference_repeats: int = 1
) -> Dict[str, float]:
    from trace3d_ns.cuda import compiled
    from trace3d_ns.cuda.rasterization import rasterization
    from trace3d_ns.cuda.reference import reference_rasterize
    from trace3d_ns.rendering import contributions

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    compile_s, cached_load_s = _compile_times(num_gaussians, size, sh_degree)
    try:
        params = [p.requires_grad_(True) for p in benchmark_scene(num_gaussians, sh_degree=sh_degree)]
        view, K = camera(size, size)

        def fwd_bwd(backend: str) -> None:
            rgb, alpha, _ = rasterization(*params, view[None], K[None], size, size, sh_degree=sh_degree, backend=backend)
            (rgb.sum() + alpha.sum()).backward()

        def compiled_with(threads: int) -> Callable[[], None]:
            def run() -> None:
                compiled.set_threads(threads)
                fwd_bwd("compiled")

            return run

        timed = _time_in_turn({"compiled_1": compiled_with(1), "compiled_2": compiled_with(2), "torch": lambda: fwd_bwd("torch")}, repeats)
        compiled.set_threads(0)
        compiled_s, tiled_s = {1: timed["compiled_1"], 2: timed["compiled_2"]}, timed["torch"]

        def brute() -> None:
            rgb, alpha, _, _ = reference_rasterize(*params, view, K, size, size, sh_degree=sh_degree)
            (rgb.sum() + alpha.sum()).backward()

        brute_s = _time(brute, reference_repeats)
        with torch.no_grad():
            m, q, s, o, _ = (p.detach() for p in params)
            n_pairs = len(contributions(m, q, s, o, view, K, size, size, backend="torch"))
            contrib_s = _time(lambda: contributions(m, q, s, o, view, K, size, size, backend="torch"), repeats)
            compiled.set_threads(1)
            compiled_contrib_s = _time(lambda: contributions(m, q, s, o, view, K, size, size, backend="compiled"), repeats)
            compiled.set_threads(0)
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
        "compiled_fwd_bwd_s": compiled_s[1],
        "compiled_fwd_bwd_2_threads_s": compiled_s[2],
        "speedup_compiled_vs_torch": tiled_s / compiled_s[1],
        "compiled_thread_scaling": compiled_s[1] / compiled_s[2],
        "compiled_contributions_s": compiled_contrib_s,
        "compile_s": compile_s,
        "cached_load_s": cached_load_s,
    }


_FIRST_CALL = """
import time, torch
from trace3d_ns.benchmarks.raster import benchmark_scene, camera
from trace3d_ns.cuda.rasterization import rasterization
params = [p.requires_grad_(True) for p in benchmark_scene({n}, sh_degree={sh})]
view, K = camera({size}, {size})
start = time.perf_counter()
rgb, alpha, _ = rasterization(*params, view[None], K[None], {size}, {size}, sh_degree={sh}, backend="compiled")
(rgb.sum() + alpha.sum()).backward()
print(time.perf_counter() - start)
"""


def _compile_times(num_gaussians: int, size: int, sh_degree: int) -> tuple:
    """Seconds of the first compiled forward + backward in a fresh process: with an empty numba
    cache (compiling every kernel), then again with the cache it filled."""
    import os
    import subprocess
    import sys
    import tempfile

    code = _FIRST_CALL.format(n=num_gaussians, sh=sh_degree, size=size)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True) for _ in range(2)]
    first, cached = (float(r.stdout.strip().splitlines()[-1]) for r in runs)
    return first, cached
