"""Cross-view consistency of instance maps against ground truth, and the evaluation on a demo scene.

Scores, over all pixels of all views at once:

- **mean best-match IoU**: for every ground-truth object (id > 0), the IoU between its pixels and
  those of the single predicted id (> 0) that overlaps it best, pooled over all views; the mean over
  objects. An object that keeps one id across views scores its per-view quality; one whose id
  changes from view to view scores about its best single view's share.
- **ARI**: scikit-learn's adjusted Rand index between predicted and ground-truth ids of all pixels.
- **mean view IoU** (diagnostic, ignores cross-view identity): the same best-match IoU computed
  per view, averaged over (view, object) pairs.

Raw patches have no cross-view identity: :func:`raw_patch_ids` offsets each view's patch ids so no
two views share one. ``python -m trace3d_ns.git.consistency --scene DIR`` traces the
perfect-geometry surface Gaussians of a generated scene (``trace3d-scene --sam-like-masks``)
through its training views with the scene's SAM-like masks and prints the scores of: raw patches;
consistent maps (the training labels: :func:`~trace3d_ns.git.merging.refine_maps` of the patch-level maps,
unless ``MergeConfig.refine`` is off); the patch-level maps (``consistent_patch_ids``: each patch
takes its traced Gaussians' majority label; ``merged_patch_ids``: its merged component's id, the
earlier definition); maps rendered from the per-Gaussian labels; and,
as the ceiling of rendered maps, the Gaussians' true instance ids rendered the same way (splats
draw silhouettes about a pixel wider than the ray-cast ground truth).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass
class ConsistencyScores:
    mean_best_iou: float
    ari: float
    mean_view_iou: float
    object_iou: Dict[int, float]
    """Best-match IoU of every ground-truth object id."""


def raw_patch_ids(patch_maps: Sequence[Tensor]) -> List[Tensor]:
    """Patch maps with per-view offsets so ids are distinct across views (0 stays 0). Each int64 [H, W]."""
    out, offset = [], 0
    for m in patch_maps:
        m = m.long()
        out.append(torch.where(m > 0, m + offset, torch.zeros_like(m)))
        offset += int(m.max()) if m.numel() else 0
    return out


def _best_iou(gt: np.ndarray, pred: np.ndarray) -> Dict[int, float]:
    """Best-match IoU of every gt id > 0 over pred ids > 0, for flat label arrays [M]."""
    pairs, inter = np.unique(np.stack([gt, pred]), axis=1, return_counts=True)  # [2, u], [u]
    gt_ids, gt_area = np.unique(gt, return_counts=True)
    pred_ids, pred_area = np.unique(pred, return_counts=True)
    area_g = gt_area[np.searchsorted(gt_ids, pairs[0])]
    area_p = pred_area[np.searchsorted(pred_ids, pairs[1])]
    iou = np.where(pairs[1] > 0, inter / (area_g + area_p - inter), 0.0)  # [u]
    best = {int(o): 0.0 for o in gt_ids if o > 0}
    for o, value in zip(pairs[0], iou):
        if o > 0:
            best[int(o)] = max(best[int(o)], float(value))
    return best


def consistency_scores(pred_maps: Sequence[Tensor], gt_maps: Sequence[Tensor]) -> ConsistencyScores:
    """Scores of predicted global-id maps against ground-truth instance maps (see module docstring)."""
    from sklearn.metrics import adjusted_rand_score

    if len(pred_maps) != len(gt_maps):
        raise ValueError(f"{len(pred_maps)} predicted maps for {len(gt_maps)} ground-truth maps")
    pred = [np.asarray(p.cpu(), dtype=np.int64).ravel() for p in pred_maps]
    gt = [np.asarray(g.cpu(), dtype=np.int64).ravel() for g in gt_maps]
    object_iou = _best_iou(np.concatenate(gt), np.concatenate(pred))
    per_view = [v for g, p in zip(gt, pred) for v in _best_iou(g, p).values()]
    return ConsistencyScores(
        mean_best_iou=float(np.mean(list(object_iou.values()))) if object_iou else 1.0,
        ari=float(adjusted_rand_score(np.concatenate(gt), np.concatenate(pred))),
        mean_view_iou=float(np.mean(per_view)) if per_view else 1.0,
        object_iou=object_iou,
    )


def evaluate_scene(
    scene_dir: Path,
    merge_config=None,
    trace_config=None,
    stride: int = 1,
    min_patch_area: int = 8,
) -> Dict[str, object]:
    """Trace surface Gaussians of a generated scene through its training views with its SAM-like
    masks, build consistent maps and score against ``gt_instances``: raw patches, consistent maps
    (merged patches, global ids) and the maps rendered from the per-Gaussian labels."""
    from PIL import Image

    from trace3d_ns.data.patches import masks_to_patches, patch_mask_alike
    from dataclasses import replace

    from trace3d_ns.git.merging import MergeConfig, consistent_instances, refine_maps, render_label_map
    from trace3d_ns.git.surface_gaussians import SurfaceGaussiansConfig, surface_scene_from_dir
    from trace3d_ns.git.tracing import TraceAccumulator
    from trace3d_ns.rendering import contributions
    from trace3d_ns.scene.generate import SCENE_FILE

    scene_dir = Path(scene_dir)
    meta = json.loads((scene_dir / SCENE_FILE).read_text())
    if meta.get("sam_masks_dir") is None:
        raise FileNotFoundError(f"{scene_dir} has no SAM-like masks (generate with --sam-like-masks)")
    start = time.perf_counter()
    scene = surface_scene_from_dir(scene_dir, SurfaceGaussiansConfig(stride=stride))
    views = meta["train_views"]
    names = [meta["file_names"][v] for v in views]
    patch_maps, alike = [], []
    for n in names:
        masks = np.load(scene_dir / meta["sam_masks_dir"] / f"{Path(n).stem}.npy")  # [K, H, W]
        patches = masks_to_patches(masks, min_patch_area)  # [H, W]
        patch_maps.append(torch.from_numpy(patches))
        alike.append(patch_mask_alike(masks, patches))
    gt_dir = scene_dir / meta["gt_instances_dir"]
    gt_maps = [torch.from_numpy(np.asarray(Image.open(gt_dir / n), dtype=np.int64)) for n in names]

    def view_contributions(v: int):
        return contributions(
            scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats[v], scene.Ks[v],
            scene.width, scene.height,
        )

    acc = TraceAccumulator(scene.num_gaussians, len(views), trace_config)
    for i, v in enumerate(views):
        acc.add_view(i, view_contributions(v), patch_maps[i])
    traces = acc.build()
    traced_s = time.perf_counter() - start
    start = time.perf_counter()
    merge_config = merge_config or MergeConfig()
    result = consistent_instances(traces, patch_maps, merge_config, alike)
    merge_s = time.perf_counter() - start
    merged_ids = consistent_instances(traces, patch_maps, replace(merge_config, patch_ids="merged"), alike).maps
    rendered, ceiling = [], []
    for v in views:  # one view's pairs at a time
        contrib = view_contributions(v)
        rendered.append(render_label_map(contrib, result.gaussian_labels))
        ceiling.append(render_label_map(contrib, scene.instance_ids))
    training = result.maps
    if merge_config.refine:
        training = refine_maps(
            result, patch_maps, lambda i: view_contributions(views[i]), merge_config.refine_min_purity,
            merge_config.refine_fill_unmasked,
        )

    raw = consistency_scores(raw_patch_ids(patch_maps), gt_maps)
    consistent = consistency_scores(training, gt_maps)
    gaussian_gt = scene.instance_ids
    return {
        "scene": str(scene_dir),
        "seed": meta["seed"],
        "train_views": len(views),
        "num_gaussians": scene.num_gaussians,
        "mean_patches_per_view": float(np.mean([int(m.max()) for m in patch_maps])),
        "raw": _summary(raw),
        "consistent": _summary(consistent),
        "consistent_patch_ids": _summary(consistency_scores(result.maps, gt_maps)),
        "merged_patch_ids": _summary(consistency_scores(merged_ids, gt_maps)),
        "rendered_labels": _summary(consistency_scores(rendered, gt_maps)),
        "rendered_true_ids": _summary(consistency_scores(ceiling, gt_maps)),
        "merge_stats": asdict(result.stats),
        "gaussian_label_purity": _purity(result.gaussian_labels, gaussian_gt),
        "store_bytes": traces.nbytes(),
        "fixture_and_trace_s": traced_s,
        "merge_s": merge_s,
    }


def _summary(scores: ConsistencyScores) -> Dict[str, object]:
    return {
        "mean_best_iou": scores.mean_best_iou,
        "ari": scores.ari,
        "mean_view_iou": scores.mean_view_iou,
        "object_iou": {str(k): round(v, 4) for k, v in scores.object_iou.items()},
    }


def _purity(labels: Tensor, gt: Tensor) -> float:
    """Share of labelled Gaussians (label > 0) whose label's majority ground-truth id is their own."""
    keep = labels > 0
    if not bool(keep.any()):
        return 0.0
    pairs, counts = torch.unique(torch.stack([labels[keep], gt[keep]]), dim=1, return_counts=True)  # [2, u], [u]
    order = torch.argsort(counts, descending=True, stable=True)
    order = order[torch.argsort(pairs[0, order], stable=True)]  # per label, most frequent gt id first
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = pairs[0, order][1:] != pairs[0, order][:-1]
    return float(counts[order][first].sum()) / int(keep.sum())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.git.consistency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scene", type=Path, required=True, help="a scene written by trace3d-scene --sam-like-masks")
    parser.add_argument("--stride", type=int, default=1, help="surface Gaussians: pixel stride of the disc samples")
    parser.add_argument(
        "--min-patch-area", type=int, default=8,
        help="patching: smaller patches (mask-jitter slivers) merge into a neighbour",
    )
    parser.add_argument(
        "--alike-by-masks", action="store_true",
        help="merging: patches of another view that one mask covers together count as alike (MergeConfig.alike_by_masks)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from trace3d_ns.git.merging import MergeConfig

    merge = MergeConfig(alike_by_masks=args.alike_by_masks)
    print(json.dumps(evaluate_scene(args.scene, stride=args.stride, min_patch_area=args.min_patch_area, merge_config=merge), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
