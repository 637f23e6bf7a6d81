"""trace3d-eval's protocol: point prompts on a training view, selections scored on the test views.

Definitions (all pixels are at the camera's full resolution; masks are boolean [H, W]):

- **Reference view** of a GT mask: the training view where the mask has the largest clearance
  (the radius of its largest inscribed disc, see `clearance`), ties broken by the larger area, then
  the lower index. ``reference_view`` overrides it with one training index for every prompt.
- **Prompt point(s)**: the first point is the mask pixel farthest from the mask boundary (Euclidean
  distance transform; the image border counts as boundary). Further points, when asked for, are
  chosen greedily by the largest min(clearance, distance to the points already chosen), which
  spreads them over the mask while keeping them inside. Objects get 1 point; foreground-only ground
  truth gets ``points`` points (default 3) and the union of their selections.
- **Selection**: ``selection.select_from_point`` at each point on the reference view (union). A
  point where nothing is rendered selects nothing (the reason is recorded).
- **Predicted silhouettes** on a test view: *alone* (amodal) = ``render_subset_alpha(selection) > 0.5``,
  the selection rendered without the rest of the scene, so occluded parts count; *visible* (modal) =
  ``subset_share(selection) > 0.5``, the selection's share of the full render's alpha * T, so
  occluders in front of it hide it as they do in the image. The GT masks are visible (modal) parts.
- **Object extraction (a)**: per object and test view where the object is visible in the GT,
  ``iou`` = IoU of the alone silhouette with the GT mask (a view where another object hides part
  of it costs IoU, the authors skip such views), ``iou_visible`` = IoU of the visible silhouette,
  and PSNR inside the GT mask's box padded by 10 px between (pred) the selected Gaussians' RGB
  rendered alone over black (colour composited over a black background: the premultiplied render)
  and (GT) the test image with every pixel outside the GT mask set to black. Per object: means over
  those views; then means over the objects. (A perfect, infinite PSNR would be recorded as null and
  left out of the means.)
- **3D extraction, amodal** (where the ground truth has ``gt_amodal/``, the object ray cast alone):
  per object and every test view where the object is in frame (its amodal mask is not empty; no
  view is skipped, nothing is hidden by other objects), ``iou_amodal`` = IoU of the alone
  silhouette with the amodal mask and ``biou`` = their boundary IoU (``metrics.boundary_iou``:
  contour bands of width 2% of the image diagonal). Per object: means over those views (``views_
  amodal``); then means over the objects: ``object_iou_amodal`` and ``object_biou``.
- **Novel-view 2D segmentation (b)**: mIoU = mean over GT objects of the object's mean
  ``iou_visible`` over the test views where it is visible (an object that cannot be prompted
  scores 0).
- **Test PSNR**: PSNR of the model's full render (its eval background) against each test image,
  averaged over the test views (``test_psnr``).
- **Foreground (c)**: prediction = visible silhouette of the union selection; NVOS mIoU =
  TP/(TP+FP+FN) and mAcc = (TP+TN)/pixels per test view, averaged over the test views. With
  instance ground truth the foreground is every object (id > 0) and the selection is the union of
  the objects' selections.

Memory: the selections are made first; then each test view's contributions are computed once,
used for every selection's visible silhouette on that view, and dropped (one view's pairs at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Literal, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from trace3d_ns.evaluation.ground_truth import View
from trace3d_ns.evaluation.metrics import box_psnr, boundary_iou, mask_iou, nvos_metrics
from trace3d_ns.rendering import Contributions, rasterize
from trace3d_ns.selection import (
    FEATURE_THRESHOLD,
    SelectionMode,
    auto_mode,
    camera_contributions,
    full_resolution_matrices,
    has_instance_labels,
    render_subset_alpha,
    select_from_point,
    subset_share,
)

SILHOUETTE_THRESHOLD = 0.5
"""A pixel belongs to the predicted silhouette when the selection's accumulated alpha exceeds this."""
BOX_PAD = 10
"""Pixels added on every side of the GT box for the object PSNR."""
BACKGROUND = 0.0
"""Background colour (black) of the object renderings and the masked GT images in the PSNR."""


class EvaluationError(Exception):
    """The evaluation cannot run as asked; the message is one line for the user."""


@dataclass
class Prompt:
    """A prompt pixel (x = column, y = row) and its distance to the mask boundary in pixels."""

    x: int
    y: int
    clearance: float


@dataclass
class Settings:
    """How selections are made."""

    mode: SelectionMode = "auto"
    threshold: float = FEATURE_THRESHOLD
    """Cosine-similarity threshold of feature selection."""
    reference_view: Optional[int] = None
    """Training-view index used for every prompt; None picks one per mask (largest clearance)."""
    points: int = 3
    """Prompt points for foreground-only ground truth."""


@dataclass
class Selected:
    """A selection made from prompts on a reference view."""

    reference: Optional[int]
    prompts: List[Prompt]
    mask: Tensor  # [N] bool
    notes: List[str] = field(default_factory=list)


# ---- prompts ------------------------------------------------------------------------------------
def clearance(mask: np.ndarray) -> np.ndarray:
    """Distance of each mask pixel to the nearest pixel outside the mask or the image. [H, W] float"""
    padded = np.pad(np.asarray(mask, dtype=bool), 1)  # the border counts as outside
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1]


def prompt_points(mask: np.ndarray, count: int = 1) -> List[Prompt]:
    """Up to `count` prompt pixels inside `mask` [H, W]: the deepest pixel first, then greedily the
    pixel maximising min(clearance, distance to the chosen points). Empty for an empty mask."""
    depth = clearance(mask)  # [H, W]
    score = depth.copy()
    rows, cols = np.indices(depth.shape)  # [H, W] each
    prompts: List[Prompt] = []
    for _ in range(count):
        flat = int(np.argmax(score))
        if score.flat[flat] <= 0:
            break
        y, x = divmod(flat, depth.shape[1])
        prompts.append(Prompt(x=x, y=y, clearance=float(depth[y, x])))
        score = np.minimum(score, np.hypot(rows - y, cols - x))
    return prompts


def reference_view(masks: Sequence[np.ndarray]) -> Optional[int]:
    """Index of the mask with the largest clearance (ties: larger area, then lower index), None if all are empty."""
    best, best_key = None, (0.0, 0)
    for i, mask in enumerate(masks):
        area = int(mask.sum())
        if area == 0:
            continue
        key = (float(clearance(mask).max()), area)
        if key > best_key:
            best, best_key = i, key
    return best


# ---- selection and rendering --------------------------------------------------------------------
def resolve_mode(model, mode: SelectionMode) -> Literal["feature", "instance", "traced", "feature_instance"]:
    """The selection mode `auto` stands for on this model; raises if the model cannot do `mode`."""
    has_labels = has_instance_labels(model)
    resolved = auto_mode(model) if mode == "auto" else mode
    if resolved in ("feature", "traced", "feature_instance") and not model.has_features:
        raise EvaluationError(f"--mode {resolved} needs a model with a feature field (feature_dim > 0)")
    if resolved in ("instance", "feature_instance") and not has_labels:
        raise EvaluationError(
            f"--mode {resolved} needs instance labels, and this checkpoint has none (run Gaussian Instance Tracing first)"
        )
    return resolved


def select(
    model, train: Sequence[View], reference: Optional[int], masks: Sequence[np.ndarray], count: int, settings: Settings
) -> Selected:
    """Union of the selections from `count` prompt points in `masks[reference]` on training view `reference`."""
    empty = torch.zeros(model.num_points, dtype=torch.bool, device=model.device)
    if reference is None:
        return Selected(None, [], empty, ["no training view shows it"])
    prompts = prompt_points(masks[reference], count)
    notes = [] if prompts else [f"not visible in reference view {train[reference].name}"]
    chosen = Selected(reference, prompts, empty, notes)
    for p in prompts:
        try:
            picked = select_from_point(model, train[reference].camera, (p.x, p.y), settings.mode, settings.threshold)
        except ValueError as err:  # e.g. nothing is rendered at the prompt pixel
            chosen.notes.append(str(err))
            continue
        chosen.mask = chosen.mask | picked
    return chosen


@torch.no_grad()
def render_subset_rgb(model, camera, mask: Tensor) -> Tensor:
    """Colour of the selected Gaussians rendered alone over black, full resolution, as the model
    shades them (same SH degree and rasterize mode). [H, W, 3]"""
    viewmat, K, W, H = full_resolution_matrices(model, camera)
    if not mask.any():
        return torch.zeros(H, W, 3, device=model.device)
    g = model.activated_gaussians(mask)
    cfg = model.config
    if cfg.sh_degree > 0:
        colors, sh_degree = g["sh"], min(model.step // cfg.sh_degree_interval, cfg.sh_degree)
    else:
        colors, sh_degree = torch.sigmoid(g["sh"]).squeeze(1), None  # [n, 3]
    render, _, _ = rasterize(
        g["means"], g["quats"], g["scales"], g["opacities"], colors, viewmat, K, W, H,
        sh_degree=sh_degree, rasterize_mode=cfg.rasterize_mode,
    )
    return render[0, ..., :3].clamp(0.0, 1.0)


def silhouette(model, camera, mask: Tensor) -> np.ndarray:
    """Silhouette of a selection rendered alone (amodal): its accumulated alpha > 0.5. [H, W] bool"""
    return (render_subset_alpha(model, camera, mask) > SILHOUETTE_THRESHOLD).cpu().numpy()


def visible_silhouette(scene: Contributions, mask: Tensor) -> np.ndarray:
    """Visible (modal) silhouette of a selection: its share of the whole scene's render > 0.5. [H, W] bool"""
    return (subset_share(scene, mask) > SILHOUETTE_THRESHOLD).cpu().numpy()


# ---- metrics ------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> Optional[float]:
    """Mean of finite values (None if there are none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _selection_record(sel: Selected, train: Sequence[View]) -> Dict:
    return {
        "reference_view": None if sel.reference is None else train[sel.reference].name,
        "prompts": [{"x": p.x, "y": p.y, "clearance_px": round(p.clearance, 2)} for p in sel.prompts],
        "num_selected": int(sel.mask.sum()),
        "notes": sel.notes,
    }


def object_view_scores(
    model, mask: Tensor, view: View, gt: np.ndarray, scene: Contributions
) -> Dict[str, Optional[float]]:
    """IoU of the alone and the visible silhouette of the selection `mask` with `gt` [H, W] on one test
    view, and the padded-box PSNR of its RGB rendered alone; `scene` is the view's contributions."""
    alone = silhouette(model, view.camera, mask)
    visible = visible_silhouette(scene, mask)
    rgb = render_subset_rgb(model, view.camera, mask)
    psnr = box_psnr(rgb, view.image, gt, pad=BOX_PAD, background=BACKGROUND)
    return {
        "iou": mask_iou(alone, gt),
        "iou_visible": mask_iou(visible, gt),
        "psnr": psnr if math.isfinite(psnr) else None,
    }


def evaluate_amodal(model, mask: Tensor, object_id: int, test: Sequence[View]) -> Dict[str, Dict[str, float]]:
    """IoU and boundary IoU of the selection rendered alone against the object rendered alone, on
    every test view with amodal ground truth where the object is in frame."""
    per_view = {}
    for view in test:
        gt = None if view.amodal is None else view.amodal.get(object_id)
        if gt is None or not gt.any():
            continue
        alone = silhouette(model, view.camera, mask)
        per_view[view.name] = {"iou": mask_iou(alone, gt), "biou": boundary_iou(alone, gt)}
    return per_view


@torch.no_grad()
def full_render_psnr(model, test: Sequence[View]) -> Dict:
    """PSNR of the full render against each test image ({"mean", "per_view"}; mean None without images)."""
    per_view = {}
    for view in test:
        if view.image is None:
            continue
        rgb = model.get_outputs(view.camera.to(model.device))["rgb"].clamp(0.0, 1.0)  # [H, W, 3]
        mse = float(torch.mean((rgb - view.image.to(rgb.device)) ** 2))
        per_view[view.name] = None if mse == 0 else -10.0 * math.log10(mse)
    return {"mean": _mean(list(per_view.values())), "per_view": per_view}


def foreground_scores(preds: Sequence[np.ndarray], test: Sequence[View]) -> Dict:
    """NVOS mIoU / mAcc of visible silhouettes `preds` (one per test view) against GT foreground (label > 0)."""
    scores = nvos_metrics(list(preds), [v.gt > 0 for v in test])
    return {
        "miou": scores["miou"],
        "macc": scores["macc"],
        "per_view": {v.name: {"iou": float(i), "acc": float(a)} for v, i, a in zip(test, scores["iou"], scores["acc"])},
    }


def score_test_views(
    model, selections: Dict[int, Tensor], foreground: Tensor, test: Sequence[View]
) -> tuple[Dict[int, Dict[str, Dict]], List[np.ndarray]]:
    """Per test view (its contributions computed once, then dropped: one view's pairs at a time),
    the scores of every selection ``selections[object id]`` [N] bool on the views showing that
    object, and the visible silhouette of ``foreground`` [N] bool. Returns ({object id: {view name:
    scores}}, foreground silhouettes in test order)."""
    per_object: Dict[int, Dict[str, Dict]] = {oid: {} for oid in selections}
    preds: List[np.ndarray] = []
    for view in test:
        scene = camera_contributions(model, view.camera)
        for oid, mask in selections.items():
            gt = view.gt == oid  # [H, W]
            if gt.any():
                per_object[oid][view.name] = object_view_scores(model, mask, view, gt, scene)
        preds.append(visible_silhouette(scene, foreground))
        del scene
    return per_object, preds


def evaluate(model, train: Sequence[View], test: Sequence[View], has_objects: bool, settings: Settings) -> Dict:
    """All metrics of one model on its test views. See the module docstring for the definitions.

    Args:
        model: A Trace3DModel (eval mode).
        train: Training views with GT (prompts are placed on them).
        test: Test views with GT and images.
        has_objects: True for instance-id GT (objects and foreground), False for foreground-only GT.
    """
    if settings.reference_view is not None and not 0 <= settings.reference_view < len(train):
        raise EvaluationError(
            f"--reference-view {settings.reference_view} is not a training view index (0..{len(train) - 1})"
        )
    resolved = resolve_mode(model, settings.mode)
    settings = replace(settings, mode=resolved)

    def ref(masks: Sequence[np.ndarray]) -> Optional[int]:
        return settings.reference_view if settings.reference_view is not None else reference_view(masks)

    result: Dict = {"mode": resolved, "threshold": settings.threshold, "num_gaussians": model.num_points}
    result["test_views"] = [v.name for v in test]
    psnr = full_render_psnr(model, test)
    result["test_psnr"] = psnr
    metrics = result["metrics"] = {"test_psnr": psnr["mean"]}
    if has_objects:
        amodal_ids = {i for v in test if v.amodal is not None for i in v.amodal}
        ids = sorted({int(i) for v in [*train, *test] for i in np.unique(v.gt) if i > 0} | amodal_ids)
        union = torch.zeros(model.num_points, dtype=torch.bool, device=model.device)
        selections: Dict[int, Selected] = {}
        for object_id in ids:
            masks = [v.gt == object_id for v in train]
            selections[object_id] = select(model, train, ref(masks), masks, 1, settings)
            union |= selections[object_id].mask
        per_object, preds = score_test_views(model, {k: s.mask for k, s in selections.items()}, union, test)
        objects = {}
        for object_id, sel in selections.items():
            per_view = per_object[object_id]
            amodal = evaluate_amodal(model, sel.mask, object_id, test)
            objects[str(object_id)] = {
                **_selection_record(sel, train),
                "views": per_view,
                "iou": _mean([s["iou"] for s in per_view.values()]),
                "iou_visible": _mean([s["iou_visible"] for s in per_view.values()]),
                "psnr": _mean([s["psnr"] for s in per_view.values()]),
                "views_amodal": amodal,
                "iou_amodal": _mean([s["iou"] for s in amodal.values()]),
                "biou": _mean([s["biou"] for s in amodal.values()]),
            }
        scored = [o for o in objects.values() if o["views"]]
        in_frame = [o for o in objects.values() if o["views_amodal"]]
        result["objects"] = objects
        result["object_extraction"] = {
            "num_objects": len(scored),
            "mean_iou": _mean([o["iou"] for o in scored]),
            "mean_iou_visible": _mean([o["iou_visible"] for o in scored]),
            "mean_psnr": _mean([o["psnr"] for o in scored]),
            "not_in_test_views": [k for k, o in objects.items() if not o["views"]],
            "mean_iou_amodal": _mean([o["iou_amodal"] for o in in_frame]),
            "mean_biou": _mean([o["biou"] for o in in_frame]),
            "num_objects_amodal": len(in_frame),
        }
        result["novel_view_segmentation"] = {
            "miou": result["object_extraction"]["mean_iou_visible"],
            "num_objects": len(scored),
        }
        metrics.update(
            object_iou_amodal=result["object_extraction"]["mean_iou_amodal"],
            object_biou=result["object_extraction"]["mean_biou"],
            novel_view_miou=result["novel_view_segmentation"]["miou"],
        )
        result["foreground"] = {"selection": "union of the object selections", **foreground_scores(preds, test)}
    else:
        masks = [v.gt > 0 for v in train]
        sel = select(model, train, ref(masks), masks, settings.points, settings)
        _, preds = score_test_views(model, {}, sel.mask, test)
        result["foreground"] = {**_selection_record(sel, train), **foreground_scores(preds, test)}
    return result
