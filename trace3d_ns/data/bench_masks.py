"""Benchmark: computing superpixel masks + patches vs loading cached patch maps.

:func:`run_masks_benchmark` returns a JSON-able dict (the ``trace3d-bench masks`` CLI writes it).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from trace3d_ns.data.mask_cache import MapCache
from trace3d_ns.data.mask_sources import SuperpixelMaskSourceConfig, file_digest
from trace3d_ns.data.patches import masks_to_patches

DTU_IMAGES = Path("/work/shared/data/dtu_scan37/images")
"""Real 400x300 images used when present (read only)."""
BENCH_HW = (300, 400)
N_CACHED = 100
MIN_PATCH_AREA = 64


def _synthetic_images(n: int, hw=BENCH_HW, seed: int = 0) -> List[np.ndarray]:
    """Smooth random blobs + noise, so Felzenszwalb has real structure to segment."""
    rng = np.random.default_rng(seed)
    H, W = hw
    yy, xx = np.mgrid[:H, :W]
    images = []
    for _ in range(n):
        img = np.zeros((H, W, 3), dtype=np.float32) + rng.uniform(0, 80, size=3)
        for _ in range(12):
            cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(15, 90)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, size=3)
        img += rng.normal(0, 6, size=img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def _load_images(n: int) -> tuple:
    """Up to ``n`` images at 400x300 and their source description (and files, if real)."""
    from PIL import Image

    if DTU_IMAGES.is_dir():
        files = sorted(p for p in DTU_IMAGES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]
        images = []
        for f in files:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if im.size != (BENCH_HW[1], BENCH_HW[0]):
                    im = im.resize((BENCH_HW[1], BENCH_HW[0]), Image.Resampling.BILINEAR)
                images.append(np.array(im))
        if images:
            return images, f"{DTU_IMAGES} ({len(images)} images)", files
    return _synthetic_images(n), "synthetic", []


def run_masks_benchmark(out: Optional[Path] = None, n_compute: int = 8) -> Dict[str, Any]:
    """Time the superpixel source (+ patching) per 400x300 image and loading 100 cached patch maps.

    Args:
        out: if given, the result is also written there as JSON.
        n_compute: number of images whose masks are actually computed (the per-image mean is used).

    Returns:
        A JSON-able dict; ``load_speedup`` = (100 x seconds per computed image) / (seconds to look
        up and load 100 cached maps, including hashing the image files for the key).
    """
    images, image_source, files = _load_images(n_compute)
    config = SuperpixelMaskSourceConfig()
    source = config.setup()
    source(images[0], Path("warmup.png"))  # imports, first-call overheads

    mask_times, patch_times, maps, n_masks = [], [], [], []
    for i, img in enumerate(images):
        t0 = time.perf_counter()
        masks = source(img, Path(f"{i}.png"))  # [K, H, W]
        t1 = time.perf_counter()
        patches = masks_to_patches(masks, min_patch_area=MIN_PATCH_AREA)  # [H, W]
        t2 = time.perf_counter()
        mask_times.append(t1 - t0)
        patch_times.append(t2 - t1)
        maps.append(patches)
        n_masks.append(int(masks.shape[0]))
    compute_per_image = float(np.mean(mask_times) + np.mean(patch_times))

    with tempfile.TemporaryDirectory(prefix="trace3d-bench-masks-") as tmp:
        tmp_path = Path(tmp)
        # 100 image files to hash for the cache key (the real files cycled, or written synthetic ones).
        if files:
            stamp_files = [files[i % len(files)] for i in range(N_CACHED)]
        else:
            from PIL import Image

            stamp_files = []
            for i in range(min(N_CACHED, len(images))):
                p = tmp_path / f"img_{i:03d}.png"
                Image.fromarray(images[i]).save(p)
                stamp_files.append(p)
            stamp_files = [stamp_files[i % len(stamp_files)] for i in range(N_CACHED)]
        names = [f"images/{i:03d}.png" for i in range(N_CACHED)]
        cached_maps = [maps[i % len(maps)] for i in range(N_CACHED)]
        shapes = [m.shape for m in cached_maps]
        cache = MapCache(tmp_path / "cache")

        def key() -> str:
            return MapCache.make_key("patches", names, [file_digest(f) for f in stamp_files], config.cache_settings())

        t0 = time.perf_counter()
        cache.save_maps("patches", key(), names, cached_maps)
        save_seconds = time.perf_counter() - t0
        cache_bytes = cache.path("patches", key()).stat().st_size
        cache.load_maps("patches", key(), names=names, shapes=shapes)  # warm the page cache

        load_only, lookup = [], []
        for _ in range(5):
            k = key()
            t0 = time.perf_counter()
            loaded = cache.load_maps("patches", k, names=names, shapes=shapes)
            load_only.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loaded = cache.load_maps("patches", key(), names=names, shapes=shapes)
            lookup.append(time.perf_counter() - t0)
        assert loaded is not None and all(np.array_equal(a, b) for a, b in zip(loaded, cached_maps))
    load_seconds = float(np.median(load_only))
    lookup_seconds = float(np.median(lookup))

    result: Dict[str, Any] = {
        "benchmark": "masks",
        "image_source": image_source,
        "image_hw": list(BENCH_HW),
        "superpixel_config": config.cache_settings(),
        "min_patch_area": MIN_PATCH_AREA,
        "n_computed": len(images),
        "mean_masks_per_image": float(np.mean(n_masks)),
        "mean_patches_per_image": float(np.mean([int(m.max()) for m in maps])),
        "superpixel_seconds_per_image": float(np.mean(mask_times)),
        "patching_seconds_per_image": float(np.mean(patch_times)),
        "compute_seconds_per_image": compute_per_image,
        "n_cached": N_CACHED,
        "cache_bytes": int(cache_bytes),
        "save_seconds_100": save_seconds,
        "load_seconds_100": load_seconds,
        "lookup_and_load_seconds_100": lookup_seconds,
        "load_speedup": N_CACHED * compute_per_image / lookup_seconds,
        "load_speedup_without_hashing": N_CACHED * compute_per_image / load_seconds,
        "goal_load_speedup": 50.0,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result
