"""Splat PLY export benchmark: our vectorized writer at scale vs nerfstudio's per-vertex writer."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict

import torch

from trace3d_ns.export.ply import SplatTable, read_ply, write_gaussian_ply


def random_splat_params(num_gaussians: int, sh_degree: int = 3, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Splatfacto-shaped random Gaussians; about 8% have opacity logits below the export threshold."""
    g = torch.Generator().manual_seed(seed)
    n = num_gaussians
    return {
        "means": torch.randn(n, 3, generator=g),
        "scales": torch.randn(n, 3, generator=g) - 4.0,
        "quats": torch.randn(n, 4, generator=g),
        "features_dc": torch.randn(n, 3, generator=g),
        "features_rest": 0.1 * torch.randn(n, (sh_degree + 1) ** 2 - 1, 3, generator=g),
        "opacities": 4.0 * torch.randn(n, 1, generator=g),
    }


def run_export_benchmark(
    num_gaussians: int = 1_000_000, nerfstudio_gaussians: int = 20_000, sh_degree: int = 3, repeats: int = 3
) -> Dict[str, float]:
    """Seconds and MB/s of `write_gaussian_ply` (median of `repeats`) on `num_gaussians`, reading
    it back, and nerfstudio's `ExportGaussianSplat.write_ply` on `nerfstudio_gaussians` extrapolated
    linearly to one million (its cost is a per-vertex loop, so linear)."""
    from nerfstudio.scripts.exporter import ExportGaussianSplat  # imports open3d (needs libusb-1.0-0)

    params = random_splat_params(num_gaussians, sh_degree)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "splat.ply"
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kept = write_gaussian_ply(path, params)
            times.append(time.perf_counter() - start)
        write_s = statistics.median(times)
        size_mb = path.stat().st_size / 1e6
        start = time.perf_counter()
        read_ply(path)
        read_s = time.perf_counter() - start

        table = SplatTable.from_params({k: v[:nerfstudio_gaussians] for k, v in params.items()})
        columns = OrderedDict((name, table.values[:, i]) for i, name in enumerate(table.names))
        start = time.perf_counter()
        ExportGaussianSplat.write_ply(str(Path(tmp) / "ns.ply"), len(table), columns)
        ns_s = time.perf_counter() - start

    ns_per_million = ns_s * 1e6 / nerfstudio_gaussians
    ours_per_million = write_s * 1e6 / num_gaussians
    return {
        "num_gaussians": num_gaussians,
        "sh_degree": sh_degree,
        "num_written": int(kept.sum()),
        "file_mb": size_mb,
        "ours_write_s": write_s,
        "ours_write_mb_per_s": size_mb / write_s,
        "ours_read_s": read_s,
        "nerfstudio_gaussians": nerfstudio_gaussians,
        "nerfstudio_write_s": ns_s,
        "nerfstudio_write_s_per_million_extrapolated": ns_per_million,
        "speedup_per_gaussian_extrapolated": ns_per_million / ours_per_million,
    }
