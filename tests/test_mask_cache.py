"""On-disk cache of patch maps: hits, misses, invalidation, corruption, atomic writes, speed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trace3d_ns.data.mask_cache import CACHE_DIRNAME, CacheWarning, MapCache, default_cache_dir
from trace3d_ns.data.mask_sources import SuperpixelMaskSourceConfig, file_digest
from trace3d_ns.data.patches import masks_to_patches

torch.set_num_threads(1)


def _write_images(folder: Path, n: int, hw=(40, 56)) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = np.zeros((*hw, 3), dtype=np.uint8)
        img[:, : hw[1] // 2] = (40 * i % 255, 200, 10)
        img += rng.integers(0, 25, size=img.shape, dtype=np.uint8)
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


class Counter:
    """compute(i) for the superpixel source that counts its calls."""

    def __init__(self, paths, config: SuperpixelMaskSourceConfig):
        self.paths, self.source, self.calls = paths, config.setup(), 0

    def __call__(self, i: int) -> np.ndarray:
        self.calls += 1
        img = np.array(Image.open(self.paths[i]))
        return masks_to_patches(self.source(img, self.paths[i]), min_patch_area=10)


def _key(paths, config: SuperpixelMaskSourceConfig) -> str:
    names = [p.name for p in paths]
    stamps = [file_digest(p) for p in paths]
    return MapCache.make_key("patches", names, stamps, {"source": config.cache_settings(), "min_patch_area": 10})


def test_hit_miss_and_invalidation(tmp_path):
    paths = _write_images(tmp_path / "images", 3)
    names = [p.name for p in paths]
    cache = MapCache(default_cache_dir(tmp_path))
    assert cache.root == tmp_path / CACHE_DIRNAME
    config = SuperpixelMaskSourceConfig(scales=(50.0, 300.0))

    counter = Counter(paths, config)
    maps, hit = cache.get_or_compute("patches", _key(paths, config), names, counter)
    assert not hit and counter.calls == 3 and len(maps) == 3
    assert all(m.dtype == np.int32 and m.shape == (40, 56) for m in maps)

    counter2 = Counter(paths, config)
    maps2, hit = cache.get_or_compute("patches", _key(paths, config), names, counter2)
    assert hit and counter2.calls == 0
    for a, b in zip(maps, maps2):
        np.testing.assert_array_equal(a, b)

    # Changed setting -> different key -> recompute.
    config_b = SuperpixelMaskSourceConfig(scales=(50.0, 301.0))
    assert _key(paths, config_b) != _key(paths, config)
    counter3 = Counter(paths, config_b)
    _, hit = cache.get_or_compute("patches", _key(paths, config_b), names, counter3)
    assert not hit and counter3.calls == 3

    # Changed image bytes (same name) -> recompute.
    img = np.array(Image.open(paths[1]))
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(paths[1])
    counter4 = Counter(paths, config)
    _, hit = cache.get_or_compute("patches", _key(paths, config), names, counter4)
    assert not hit and counter4.calls == 3

    # Image order is part of the key.
    rev = paths[::-1]
    assert _key(rev, config) != _key(paths, config)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupted_cache_is_detected_and_recomputed(tmp_path, damage):
    paths = _write_images(tmp_path / "images", 2)
    names = [p.name for p in paths]
    cache = MapCache(tmp_path / "cache")
    config = SuperpixelMaskSourceConfig()
    key = _key(paths, config)
    maps, _ = cache.get_or_compute("patches", key, names, Counter(paths, config))
    path = cache.path("patches", key)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        b = bytearray(raw)
        b[len(b) // 2] ^= 0xFF
        path.write_bytes(bytes(b))
    else:
        path.write_bytes(b"not a zip file at all")
    counter = Counter(paths, config)
    with pytest.warns(CacheWarning, match="recomputing"):
        maps2, hit = cache.get_or_compute("patches", key, names, counter)
    assert not hit and counter.calls == 2
    for a, b in zip(maps, maps2):
        np.testing.assert_array_equal(a, b)
    # And the rewritten file is good again.
    assert cache.load_maps("patches", key, names=names) is not None


def test_checksum_mismatch_and_wrong_shapes_are_misses(tmp_path):
    cache = MapCache(tmp_path)
    maps = [np.arange(12, dtype=np.int32).reshape(3, 4), np.full((2, 5), 70000, dtype=np.int32)]
    cache.save_maps("patches", "k1", ["a", "b"], maps)
    # Payload rewritten with a valid zip but inconsistent data: checksum catches it.
    with np.load(cache.path("patches", "k1")) as z:
        fields = {k: z[k] for k in z.files}
    fields["data"] = fields["data"].copy()
    fields["data"][0] += 1
    np.savez(cache.path("patches", "k1"), **fields)
    with pytest.warns(CacheWarning, match="checksum"):
        assert cache.load_maps("patches", "k1") is None
    assert not cache.path("patches", "k1").exists()

    cache.save_maps("patches", "k2", ["a", "b"], maps)
    with pytest.warns(CacheWarning, match="shapes"):
        assert cache.load_maps("patches", "k2", shapes=[(3, 4), (5, 2)]) is None


def test_roundtrip_dtypes_and_kinds(tmp_path):
    cache = MapCache(tmp_path)
    big = np.array([[0, 70000], [-1, 5]], dtype=np.int64)  # needs int32, has -1 (e.g. "unlabelled")
    small = np.array([[0, 3]], dtype=np.int32)
    cache.save_maps("patches", "k", ["a", "b"], [small, small])
    cache.save_maps("consistent", "k", ["a", "b"], [big, small], meta={"threshold": 0.5})
    patches = cache.load_maps("patches", "k")
    consistent = cache.load_maps("consistent", "k", names=["a", "b"])
    assert patches is not None and consistent is not None
    np.testing.assert_array_equal(consistent[0], big)
    assert consistent[0].dtype == np.int32
    np.testing.assert_array_equal(patches[1], small)
    assert cache.load_meta("consistent", "k") == {"threshold": 0.5}
    assert cache.load_maps("consistent", "other") is None


def test_writes_are_atomic(tmp_path, monkeypatch):
    cache = MapCache(tmp_path / "c")
    cache.save_maps("patches", "good", ["a"], [np.zeros((2, 2), dtype=np.int32)])

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(RuntimeError):
        cache.save_maps("patches", "bad", ["a"], [np.zeros((2, 2), dtype=np.int32)])
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["patches-good.npz"]  # no partial final file, no leftover temp file


def test_loading_is_at_least_50x_faster_than_computing(tmp_path):
    paths = _write_images(tmp_path / "images", 3, hw=(96, 128))
    config = SuperpixelMaskSourceConfig()
    counter = Counter(paths, config)
    counter(0)  # warm-up (imports)
    t0 = time.perf_counter()
    computed = [counter(i) for i in range(3)]
    per_image = (time.perf_counter() - t0) / 3
    cache = MapCache(tmp_path / "cache")
    names = [f"img_{i:03d}.png" for i in range(100)]
    cache.save_maps("patches", "k", names, [computed[i % 3] for i in range(100)])
    cache.load_maps("patches", "k", names=names)  # warm the page cache
    t0 = time.perf_counter()
    loaded = cache.load_maps("patches", "k", names=names)
    load_time = time.perf_counter() - t0
    assert loaded is not None and len(loaded) == 100
    assert 100 * per_image / load_time >= 50, (per_image, load_time)


def test_benchmark_function_reports_a_json_dict(tmp_path):
    import json

    from trace3d_ns.data.bench_masks import run_masks_benchmark

    out = tmp_path / "bench" / "masks.json"
    result = run_masks_benchmark(out, n_compute=2)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["image_hw"] == [300, 400] and result["n_cached"] == 100
    assert result["compute_seconds_per_image"] > 0 and result["lookup_and_load_seconds_100"] > 0
    assert result["load_speedup"] >= 50
