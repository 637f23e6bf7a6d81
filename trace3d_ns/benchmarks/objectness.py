"""How whole are the objects in a mask source's masks and patches? Measured per view against
ground-truth foreground, without training: DTU scan 37 (``gt_masks/``) and the Blender LEGO (alpha
of its training images), from ``../shared/data``.

    trace3d-bench objectness [--scene dtu_scan37|lego] [--out FILE.json]
    python -m trace3d_ns.benchmarks.objectness [--scene ...] [--every K] [--out FILE.json]

Each source (``SOURCES``) runs on every training image as the datamanager feeds it (RGB uint8, an
alpha channel dropped), and its masks become patches as in training
(:func:`~trace3d_ns.data.patches.masks_to_patches` with the datamanager's defaults). Per view, with
F the GT foreground and B the rest:

- ``mask_iou`` / ``patch_iou``: the best IoU of any single mask / patch with F, and that mask's /
  patch's ``precision`` (share of it inside F: how far it crosses the object boundary) and
  ``recall`` (share of F it covers);
- ``whole``: the view has a mask / patch with IoU >= 0.9 (the object whole in one piece);
- ``cohesion``: the probability that two random pixels of F lie in one patch,
  ``sum_p (|p & F| / |F|)^2``; ``leakage``: the probability that a random pixel of F and one of B
  lie in one patch, ``sum_p |p & F| |p & B| / (|F| |B|)``. GIT merges two patches of a view when
  their Gaussians land in one patch in most other views, so the mean cohesion over views estimates
  how strongly the views vote to join an object's parts (above 0.5: they merge), the mean leakage
  how strongly they vote to join the object to its background;
- ``impurity``: the share of pixels in a patch whose majority is on the other side of the GT
  boundary (every patch's crossing, not only the best one's).

Patch ``0`` (covered by no mask) is not an instance and is left out of all of these.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from trace3d_ns.data.levels import LevelsMaskSource, LevelsMaskSourceConfig
from trace3d_ns.data.mask_sources import MaskSourceConfig, SuperpixelMaskSourceConfig, as_rgb_uint8
from trace3d_ns.data.patches import masks_to_patches

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WHOLE_IOU = 0.9
"""A mask or patch with at least this IoU against the foreground holds the object whole."""
MIN_PATCH_AREA = 64
SMALL_PATCH_POLICY = "merge"
"""Patching as ``Trace3DDataManagerConfig``'s defaults."""

SCENES: Dict[str, str] = {"dtu_scan37": "images", "lego": "train"}
"""Scene folder -> the folder of its training images."""

SOURCES: Dict[str, Callable[[], MaskSourceConfig]] = {
    # the weights-free default before `levels`: the same two scales in every view
    "superpixel": SuperpixelMaskSourceConfig,
    # what the LEGO foreground run used: a third, coarse scale in every view
    "superpixel_100_500_2000": lambda: SuperpixelMaskSourceConfig(scales=(100.0, 500.0, 2000.0)),
    # a fine and a coarse level in every view: the coarse masks hold objects, but a patch is the
    # intersection of the masks covering it, so the patches are the fine level's
    "superpixel_500_4000": lambda: SuperpixelMaskSourceConfig(scales=(500.0, 4000.0)),
    # one level per view, drawn (stratified) from the default levels
    "levels": LevelsMaskSourceConfig,
    # the same without the scale-stability filter
    "levels_no_stability": lambda: LevelsMaskSourceConfig(stability_ratio=0.0),
    # one coarse level in every view: what the draw adds to coarseness alone
    "levels_only_2800": lambda: LevelsMaskSourceConfig(scales=(2800.0,)),
    "levels_only_4000": lambda: LevelsMaskSourceConfig(scales=(4000.0,)),
}


def _best(inter: np.ndarray, area: np.ndarray, fg_area: int) -> Dict[str, float]:
    """IoU, precision and recall of the region with the best IoU (regions: overlap with F and size)."""
    if len(area) == 0 or fg_area == 0:
        return {"iou": 0.0, "precision": 0.0, "recall": 0.0}
    iou = inter / np.maximum(area + fg_area - inter, 1)
    k = int(np.argmax(iou))
    return {"iou": float(iou[k]), "precision": float(inter[k] / max(area[k], 1)), "recall": float(inter[k] / fg_area)}


def view_scores(masks: np.ndarray, patches: np.ndarray, fg: np.ndarray) -> Dict[str, float]:
    """Objectness of one view's masks [K, H, W] bool and patches [H, W] int (0 = none) against the
    foreground fg [H, W] bool (see the module docstring)."""
    F = int(fg.sum())
    B = int(fg.size - F)
    mask_inter = masks[:, fg].sum(axis=1).astype(np.float64)  # [K]
    mask_area = masks.reshape(masks.shape[0], -1).sum(axis=1).astype(np.float64)  # [K]
    n = int(patches.max()) + 1
    inter = np.bincount(patches[fg], minlength=n)[1:].astype(np.float64)  # [T] (patch 0 left out)
    area = np.bincount(patches.ravel(), minlength=n)[1:].astype(np.float64)  # [T]
    outside = area - inter
    mask_best, patch_best = _best(mask_inter, mask_area, F), _best(inter, area, F)
    return {
        "num_masks": int(masks.shape[0]),
        "num_patches": int(n - 1),
        **{f"mask_{k}": v for k, v in mask_best.items()},
        **{f"patch_{k}": v for k, v in patch_best.items()},
        "mask_whole": float(mask_best["iou"] >= WHOLE_IOU),
        "patch_whole": float(patch_best["iou"] >= WHOLE_IOU),
        "cohesion": float(((inter / F) ** 2).sum()) if F else 0.0,
        "leakage": float((inter * outside).sum() / (F * B)) if F and B else 0.0,
        "impurity": float(np.minimum(inter, outside).sum() / fg.size),
    }


def scene_views(scene_dir: Path, image_folder: str) -> List[Path]:
    """The scene's training images, in name order (numbers compared as numbers)."""
    folder = scene_dir / image_folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: {scene_dir} is not the scene expected")
    paths = [p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    digits = lambda p: int("".join(c for c in p.stem if c.isdigit()) or -1)  # noqa: E731
    return sorted(paths, key=lambda p: (digits(p), p.name))


def load_view(path: Path, gt) -> tuple:
    """(RGB uint8 [H, W, 3] as the datamanager feeds it to a mask source, GT foreground [H, W] bool)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = as_rgb_uint8(np.asarray(im))
    labels = gt.load(path, rgb.shape[1], rgb.shape[0])
    if labels is None:
        raise FileNotFoundError(f"no ground truth for {path} ({gt.expected_example(path)})")
    return rgb, labels > 0


SUMMARY_KEYS = ("mask_iou", "mask_precision", "mask_recall", "patch_iou", "patch_precision", "patch_recall",
                "mask_whole", "patch_whole", "cohesion", "leakage", "impurity", "num_masks", "num_patches")
PER_VIEW_KEYS = ("mask_iou", "patch_iou", "mask_precision", "cohesion")


def measure_source(config: MaskSourceConfig, views: Sequence[tuple]) -> Dict:
    """Scores of one source over ``views`` ((path, rgb, fg) each): means over the views, and the
    per-view values of ``PER_VIEW_KEYS`` (plus the drawn level for a ``levels`` source)."""
    source = config.setup()
    source.prepare([path for path, _, _ in views])  # as the datamanager does
    start = time.perf_counter()
    scores = []
    for path, rgb, fg in views:
        masks = source(rgb, path)  # [K, H, W]
        patches = masks_to_patches(masks, MIN_PATCH_AREA, SMALL_PATCH_POLICY)  # [H, W]
        scores.append(view_scores(masks, patches, fg))
    out: Dict = {"settings": config.cache_settings(), "seconds_per_view": (time.perf_counter() - start) / max(len(views), 1)}
    out["mean"] = {k: float(np.mean([s[k] for s in scores])) for k in SUMMARY_KEYS}
    out["per_view"] = {k: [round(s[k], 3) for s in scores] for k in PER_VIEW_KEYS}
    if isinstance(source, LevelsMaskSource):
        out["per_view"]["level"] = [source.level(path) for path, _, _ in views]
    return out


def run_objectness_benchmark(
    scenes: Optional[Sequence[str]] = None,
    data: Optional[Path] = None,
    sources: Optional[Dict[str, Callable[[], MaskSourceConfig]]] = None,
    every: int = 1,
) -> Dict:
    """Measure ``sources`` (default ``SOURCES``) on ``scenes`` (default all of ``SCENES``) under
    ``data`` (default ``../shared/data``), every ``every``-th view; JSON-ready."""
    from trace3d_ns.evaluation.ground_truth import find_ground_truth

    data = Path(data) if data is not None else SHARED_DATA
    sources = sources or SOURCES
    result: Dict = {"whole_iou": WHOLE_IOU, "min_patch_area": MIN_PATCH_AREA, "scenes": {}}
    for scene in scenes or list(SCENES):
        if scene not in SCENES:
            raise ValueError(f"unknown scene {scene!r}; known: {sorted(SCENES)}")
        gt = find_ground_truth(data / scene)
        paths = scene_views(data / scene, SCENES[scene])[:: max(every, 1)]
        views = [(p, *load_view(p, gt)) for p in paths]
        result["scenes"][scene] = {
            "views": [p.name for p in paths],
            "image_hw": list(views[0][1].shape[:2]) if views else None,
            "sources": {name: measure_source(make(), views) for name, make in sources.items()},
        }
    return result


def summary(result: Dict) -> Dict:
    """Per scene and source: the mean best-mask and best-patch IoU, the share of views with the
    object whole in one mask / patch, the best mask's precision, the best patch's recall, cohesion
    and leakage."""
    keys = ("mask_iou", "patch_iou", "mask_whole", "patch_whole", "mask_precision", "patch_recall", "cohesion",
            "leakage")
    return {
        scene: {name: {k: round(s["mean"][k], 3) for k in keys} for name, s in r["sources"].items()}
        for scene, r in result["scenes"].items()
    }


def objectness_table(scene_result: Dict) -> List[str]:
    """Markdown rows: one per source of one scene's result (``result["scenes"][scene]``)."""
    rows = [
        "| mask source | best patch IoU | views with the object in one patch | best mask IoU | best mask precision | "
        "best patch recall | cohesion | leakage | patches per view |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in scene_result["sources"].items():
        m = s["mean"]
        rows.append(
            f"| `{name}` | {m['patch_iou']:.3f} | {100 * m['patch_whole']:.0f}% | {m['mask_iou']:.3f} | "
            f"{m['mask_precision']:.3f} | {m['patch_recall']:.3f} | {m['cohesion']:.3f} | {m['leakage']:.3f} | "
            f"{m['num_patches']:.1f} |"
        )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.benchmarks.objectness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scene", choices=sorted(SCENES), action="append", help="a scene (repeat; default: all)")
    parser.add_argument("--every", type=int, default=1, help="measure every K-th view")
    parser.add_argument("--data", type=Path, default=None, help="folder holding the scenes (default: ../shared/data)")
    parser.add_argument("--out", type=Path, default=None, help="also write the full JSON result here")
    args = parser.parse_args(argv)
    result = run_objectness_benchmark(args.scene, args.data, every=args.every)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
