"""Segmented export: one ns-export PLY per instance, the labelled full scene, and `instances.json`.

Labels are per Gaussian: an id > 0 is an instance, 0 is unassigned/background and -1 is ambiguous or
pruned. Only ids > 0 are instances ("all"); an explicit id list may also name 0 to write the
background as `instance_0.ply`.

Every file applies ns-export's filter (NaN/Inf rows and opacity logits below logit(1/255) are
dropped), and all counts, boxes and colours in `instances.json` describe the Gaussians actually
written.

`instances.json`::

    {
      "scene_file": "scene.ply",          # all exported Gaussians, int32 property `instance`
      "num_gaussians": N,                 # in the model
      "num_exported": M,                  # in scene.ply, after ns-export's filter
      "num_background": ..., "num_ambiguous": ...,   # label 0 / label -1 among the exported
      "min_gaussians": ..., "bbox": {"method": "exact"} | {"method": "percentile", "percentiles": [lo, hi]},
      # mean_rgb: unweighted mean over the instance's Gaussians of clamp(C0 * f_dc + 0.5, 0, 1)
      "instances": [{"id", "file", "num_gaussians", "bbox_min", "bbox_max", "mean_rgb"}, ...],
      "skipped":   [{"id", "num_gaussians", "reason"}, ...]
    }

Files of earlier runs that this run does not write (e.g. an `instance_7.ply` of another labelling)
are left alone; `instances.json` lists the files that belong to this export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from trace3d_ns.export.ply import SH_C0, ArrayLike, SplatTable, write_gaussian_ply, write_ply

SCENE_FILE = "scene.ply"
INDEX_FILE = "instances.json"
Instances = Union[Literal["all"], Sequence[int]]


def instance_labels_from_model(model: object) -> Optional[np.ndarray]:
    """The model's per-Gaussian instance labels (`model.instance_labels`) as int64 [N], or None when
    it has none yet (Trace3DModel keeps an empty buffer until Gaussian Instance Tracing runs)."""
    labels = getattr(model, "instance_labels", None)
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    return labels if labels.size > 0 else None


def instance_file(instance_id: int) -> str:
    """File name of one instance's PLY."""
    return f"instance_{instance_id}.ply"


def gaussian_rgb(table: SplatTable) -> np.ndarray:
    """Per-Gaussian base colour clamp(C0 * f_dc + 0.5, 0, 1) from the SH DC term. [N, 3]"""
    dc = table.values[:, [table.names.index(f"f_dc_{c}") for c in range(3)]]  # [N, 3]
    return np.clip(SH_C0 * dc + 0.5, 0.0, 1.0)


def bounding_box(
    points: np.ndarray, percentiles: Optional[Tuple[float, float]] = None
) -> Tuple[List[float], List[float]]:
    """Axis-aligned box (min, max) of points [M, 3]: exact, or per-axis (lo, hi) percentiles."""
    if percentiles is None:
        return points.min(axis=0).tolist(), points.max(axis=0).tolist()
    lo, hi = np.percentile(points, percentiles, axis=0)
    return lo.tolist(), hi.tolist()


def _select_ids(labels: np.ndarray, instances: Instances) -> np.ndarray:
    """Sorted instance ids to export: every id > 0 for "all", else the requested ids (must occur)."""
    present = np.unique(labels)
    if isinstance(instances, str):
        if instances != "all":
            raise ValueError(f"instances must be 'all' or a list of ids, not {instances!r}")
        return present[present > 0]
    requested = np.unique(np.asarray(list(instances), dtype=np.int64))
    if requested.size == 0:
        raise ValueError("no instance ids requested")
    if (requested < 0).any():
        raise ValueError("instance ids must be >= 0 (-1 marks ambiguous Gaussians, not an instance)")
    missing = np.setdiff1d(requested, present)
    if missing.size:
        shown = present[present > 0]
        raise ValueError(
            f"instance ids {missing.tolist()} are not in the labels (instances present: "
            f"{shown[:20].tolist()}{' ...' if shown.size > 20 else ''})"
        )
    return requested


def export_segmented(
    source: Union[Mapping[str, ArrayLike], object],
    labels: ArrayLike,
    output_dir: Union[str, Path],
    instances: Instances = "all",
    min_gaussians: int = 1,
    bbox_percentiles: Optional[Tuple[float, float]] = None,
) -> Dict:
    """Write `scene.ply`, `instance_<id>.ply` per selected instance and `instances.json`; return the index.

    Args:
        source: Gaussian parameters (a mapping of tensors/arrays) or a model with `gauss_params`.
        labels: Per-Gaussian instance id [N]: > 0 instance, 0 background, -1 ambiguous/pruned.
        output_dir: Created if needed; only the files named above are (over)written.
        instances: "all" (every id > 0) or explicit ids, each of which must occur in `labels`.
        min_gaussians: Instances with fewer exported Gaussians are listed under "skipped", not written.
        bbox_percentiles: None for exact boxes, or (lo, hi) percentiles (e.g. (1, 99)) per axis,
            robust to stray Gaussians.
    """
    table = source if isinstance(source, SplatTable) else SplatTable.from_params(source)
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.shape != (len(table),) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers of shape ({len(table)},), got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < -1:
        raise ValueError("labels must be >= -1")
    if min_gaussians < 1:
        raise ValueError(f"min_gaussians must be >= 1, got {min_gaussians}")
    if bbox_percentiles is not None and not 0 <= bbox_percentiles[0] <= bbox_percentiles[1] <= 100:
        raise ValueError(f"bbox percentiles must satisfy 0 <= lo <= hi <= 100, got {bbox_percentiles}")
    ids = _select_ids(labels, instances)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep = write_gaussian_ply(out / SCENE_FILE, table, extra={"instance": labels.astype(np.int32)})
    kept, kept_labels = table.subset(keep), labels[keep]  # [M, F], [M]
    rgb = gaussian_rgb(kept)  # [M, 3]
    means = kept.values[:, :3]  # [M, 3]

    order = np.argsort(kept_labels, kind="stable")  # rows grouped by label, file order within a label
    starts = np.searchsorted(kept_labels[order], ids, side="left")
    ends = np.searchsorted(kept_labels[order], ids, side="right")
    written, skipped = [], []
    for instance_id, start, end in zip(ids.tolist(), starts, ends):
        rows = order[start:end]
        if rows.size < min_gaussians:
            reason = f"fewer than {min_gaussians} exported Gaussians"
            skipped.append({"id": instance_id, "num_gaussians": int(rows.size), "reason": reason})
            continue
        write_ply(out / instance_file(instance_id), kept.subset(rows).to_vertices())
        lo, hi = bounding_box(means[rows], bbox_percentiles)
        written.append(
            {
                "id": instance_id,
                "file": instance_file(instance_id),
                "num_gaussians": int(rows.size),
                "bbox_min": lo,
                "bbox_max": hi,
                "mean_rgb": rgb[rows].mean(axis=0).tolist(),
            }
        )

    bbox = {"method": "exact"}
    if bbox_percentiles is not None:
        bbox = {"method": "percentile", "percentiles": list(bbox_percentiles)}
    index = {
        "scene_file": SCENE_FILE,
        "num_gaussians": len(table),
        "num_exported": len(kept),
        "num_background": int((kept_labels == 0).sum()),
        "num_ambiguous": int((kept_labels == -1).sum()),
        "min_gaussians": min_gaussians,
        "bbox": bbox,
        "instances": written,
        "skipped": skipped,
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index
