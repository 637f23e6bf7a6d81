"""The weights-free ``levels`` mask source and the objectness measures of ``trace3d-bench objectness``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trace3d_ns.benchmarks.objectness import view_scores
from trace3d_ns.data.levels import (
    LevelsMaskSource,
    LevelsMaskSourceConfig,
    draw_level,
    level_counts,
    stratified_levels,
)
from trace3d_ns.data.mask_sources import make_mask_source
from trace3d_ns.data.patches import masks_to_patches


def _scene(h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    """A grey background with a two-part object: a red and an orange block side by side (weak
    boundary between them, strong one to the background)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 40, dtype=np.int64)
    img[15:45, 15:40] = (200, 40, 30)
    img[15:45, 40:65] = (210, 55, 30)
    img += rng.integers(-6, 7, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_each_view_gets_one_partition_from_its_level():
    source = LevelsMaskSourceConfig(scales=(30.0, 3000.0), reference_pixels=0, min_size=20).setup()
    assert isinstance(source, LevelsMaskSource)
    img = _scene()
    fine, coarse = source.segments(img, 0), source.segments(img, 1)
    # The fine level splits the object; the coarse one keeps it whole (inside its blurred rim), apart
    # from the background.
    assert len(np.unique(fine[17:43, 17:63])) > 1
    obj = coarse[17:43, 17:63]
    assert len(np.unique(obj)) == 1 and not (coarse[:10] == obj[0, 0]).any()
    path = Path("scene/images/003.png")
    masks = source(img, path)
    assert masks.dtype == bool and masks.shape[1:] == img.shape[:2]
    np.testing.assert_array_equal(masks.sum(0), 1)  # a partition: every pixel in exactly one mask
    expected = source.segments(img, source.level(path))
    assert masks.shape[0] == expected.max() + 1
    np.testing.assert_array_equal(masks.argmax(0), expected)
    # Its patches are its segments (no intersection with another level).
    assert masks_to_patches(masks).max() == masks.shape[0]


def test_levels_are_drawn_per_view_deterministically_and_stratified():
    weights = (1.0, 1.0, 2.0)
    paths = [Path(f"data/images/{i:03d}.png") for i in range(40)]
    a = LevelsMaskSourceConfig(scales=(1.0, 2.0, 3.0), weights=weights).setup()
    a.prepare(paths)
    levels = [a.level(p) for p in paths]
    assert Counter(levels) == {0: 10, 1: 10, 2: 20}  # exact shares
    b = LevelsMaskSourceConfig(scales=(1.0, 2.0, 3.0), weights=weights).setup()
    b.prepare(list(reversed(paths)))
    assert [b.level(p) for p in paths] == levels  # not the order
    c = LevelsMaskSourceConfig(scales=(1.0, 2.0, 3.0), weights=weights, seed=1).setup()
    c.prepare(paths)
    assert [c.level(p) for p in paths] != levels  # the seed
    # Without a plan every view draws on its own, from the same hash, in the weights' proportions.
    unplanned = LevelsMaskSourceConfig(scales=(1.0, 2.0, 3.0), weights=weights).setup()
    many = [unplanned.level(Path(f"x/{i}.png")) for i in range(4000)]
    assert many == [draw_level(0, f"x/{i}.png", weights) for i in range(4000)]
    share = np.bincount(many, minlength=3) / len(many)
    np.testing.assert_allclose(share, [0.25, 0.25, 0.5], atol=0.03)


def test_level_counts_and_stratified_levels():
    assert level_counts(10, (1.0, 1.0, 1.0)) == [4, 3, 3]
    assert level_counts(7, (0.0, 1.0)) == [0, 7]
    assert sum(level_counts(49, (1.0, 2.0, 2.0, 1.0))) == 49
    keys = [f"a/{i}" for i in range(9)]
    plan = stratified_levels(3, keys, (1.0, 2.0))
    assert sorted(plan) == sorted(keys) and Counter(plan.values()) == {0: 3, 1: 6}
    assert stratified_levels(3, keys + keys[:2], (1.0, 2.0)) == plan  # duplicates count once


def test_scales_follow_the_image_size():
    source = LevelsMaskSourceConfig(scales=(1000.0,), min_size=40, reference_pixels=10_000).setup()
    assert source.felzenszwalb_settings(0, 100, 100) == (1000.0, 40)
    scale, min_size = source.felzenszwalb_settings(0, 200, 200)  # 4x the pixels
    assert scale == pytest.approx(2000.0) and min_size == 160
    absolute = LevelsMaskSourceConfig(scales=(1000.0,), min_size=40, reference_pixels=0).setup()
    assert absolute.felzenszwalb_settings(0, 200, 200) == (1000.0, 40)


def test_bad_settings_are_refused_and_settings_key_the_cache(tmp_path):
    with pytest.raises(ValueError, match="at least one scale"):
        LevelsMaskSourceConfig(scales=()).setup()
    with pytest.raises(ValueError, match="2 values for 3 scales"):
        LevelsMaskSourceConfig(scales=(1.0, 2.0, 3.0), weights=(1.0, 1.0)).setup()
    with pytest.raises(ValueError, match="positive sum"):
        LevelsMaskSourceConfig(scales=(1.0,), weights=(0.0,)).setup()
    settings = LevelsMaskSourceConfig().cache_settings()
    assert settings["seed"] == 0 and settings["scales"] == [2800.0, 4000.0] and settings["weights"] == []
    assert LevelsMaskSourceConfig(seed=5).cache_settings() != settings
    configs = {"levels": LevelsMaskSourceConfig()}
    assert isinstance(make_mask_source("levels", configs, device="cpu", data_dir=tmp_path), LevelsMaskSource)


def test_view_scores_best_mask_patch_cohesion_and_leakage():
    fg = np.zeros((4, 4), dtype=bool)
    fg[:, :2] = True  # 8 foreground pixels, 8 background
    left_top, left_bottom = np.zeros_like(fg), np.zeros_like(fg)
    left_top[:2, :2] = True
    left_bottom[2:, :2] = True
    whole_plus = fg.copy()
    whole_plus[0, 2] = True  # the object and one background pixel
    masks = np.stack([left_top, left_bottom, whole_plus, ~whole_plus])
    patches = masks_to_patches(masks)  # left_top, left_bottom, {(0, 2)}, the rest
    s = view_scores(masks, patches, fg)
    assert s["num_masks"] == 4 and s["num_patches"] == 4
    assert s["mask_iou"] == pytest.approx(8 / 9) and s["mask_precision"] == pytest.approx(8 / 9)
    assert s["mask_recall"] == 1.0 and s["mask_whole"] == 0.0
    assert s["patch_iou"] == pytest.approx(0.5) and s["patch_precision"] == 1.0 and s["patch_whole"] == 0.0
    assert s["cohesion"] == pytest.approx(0.5)  # two halves: two random object pixels share one half as often as not
    assert s["leakage"] == 0.0 and s["impurity"] == 0.0
    # One patch holding the object and half the background: cohesion 1, leakage 1/2, impurity 4/16.
    joined = np.stack([fg | (np.arange(4)[None, :] == 2), ~(fg | (np.arange(4)[None, :] == 2))])
    s = view_scores(joined, masks_to_patches(joined), fg)
    assert s["cohesion"] == 1.0 and s["leakage"] == pytest.approx(0.5) and s["impurity"] == pytest.approx(4 / 16)
    assert s["mask_iou"] == pytest.approx(8 / 12)


def test_objectness_benchmark_on_a_small_scene_folder(tmp_path):
    from PIL import Image

    from trace3d_ns.benchmarks.objectness import SOURCES, objectness_table, run_objectness_benchmark, summary

    scene = tmp_path / "dtu_scan37"  # DTU's layout: images/ and gt_masks/ matched by number
    (scene / "images").mkdir(parents=True)
    (scene / "gt_masks").mkdir()
    for i in range(3):
        img = np.repeat(np.repeat(_scene(seed=i), 4, axis=0), 4, axis=1)  # 240x320: the scales' usual size
        Image.fromarray(img).save(scene / "images" / f"{i:03d}.png")
        fg = np.zeros(img.shape[:2], dtype=np.uint8)
        fg[60:180, 60:260] = 255
        Image.fromarray(fg).save(scene / "gt_masks" / f"{i:03d}.png")
    result = run_objectness_benchmark(["dtu_scan37"], tmp_path)
    r = result["scenes"]["dtu_scan37"]
    assert r["views"] == ["000.png", "001.png", "002.png"] and r["image_hw"] == [240, 320]
    assert set(r["sources"]) == set(SOURCES)
    assert len(r["sources"]["levels"]["per_view"]["level"]) == 3
    means = {name: s["mean"] for name, s in r["sources"].items()}
    # Fine scales in every view split the object into small patches; one coarse level per view keeps it
    # whole, or in two blocks where the noise makes their colours differ more (2 of 3 views whole, measured).
    assert means["superpixel"]["patch_iou"] < 0.4 and means["superpixel"]["patch_whole"] == 0.0
    assert means["levels"]["patch_iou"] > 0.7 and means["levels"]["patch_whole"] >= 2 / 3
    assert summary(result)["dtu_scan37"]["levels"]["patch_iou"] == round(means["levels"]["patch_iou"], 3)
    rows = objectness_table(r)
    assert len(rows) == 2 + len(SOURCES) and rows[2 + list(SOURCES).index("levels")].startswith("| `levels` | ")
    with pytest.raises(ValueError, match="unknown scene"):
        run_objectness_benchmark(["fern"], tmp_path)


def test_unstable_segments_are_replaced_by_the_finer_ones_inside_them():
    from trace3d_ns.data.levels import stable_segments

    labels = np.array([[0, 0, 0, 0, 1, 1, 1, 1]] * 3)  # two segments
    finer = np.array([[0, 0, 1, 1, 2, 2, 2, 2]] * 3)  # the left one split at the finer scale
    out = stable_segments(labels, finer, min_iou=0.8)
    assert len(np.unique(out[:, :4])) == 2 and len(np.unique(out[:, 4:])) == 1  # left split, right kept
    assert len(np.unique(out)) == 3 and out.min() == 0 and out.max() == 2
    assert len(np.unique(stable_segments(labels, finer, min_iou=0.5))) == 2  # IoU 0.5 is enough there


def test_stability_filter_splits_a_segment_that_crossed_a_weak_edge():
    image = np.full((32, 32, 3), 100, np.uint8)
    image[:, 16:] = 112  # a weak edge: one segment at the coarse scale only
    plain = LevelsMaskSourceConfig(scales=(20000.0,), reference_pixels=0, min_size=5).setup()
    assert len(plain(image, Path("a.png"))) == 1
    stable = LevelsMaskSourceConfig(scales=(20000.0,), reference_pixels=0, min_size=5, stability_ratio=0.01).setup()
    masks = stable(image, Path("a.png"))  # [n, H, W]
    assert masks.sum(axis=0).min() == 1 and masks.sum(axis=0).max() == 1  # still a partition
    left, right = masks[:, :, :16].any(axis=(1, 2)), masks[:, :, 16:].any(axis=(1, 2))  # [n]
    assert not (left & right).any()  # no segment crosses the edge any more
    assert plain.cache_settings() != stable.cache_settings()
    for bad in ({"stability_ratio": 1.5}, {"stability_ratio": -0.1}, {"stability_min_iou": 0.0}):
        with pytest.raises(ValueError, match="stability"):
            LevelsMaskSourceConfig(**bad).setup()
