"""Segmentation metrics: mask IoU, boundary IoU, NVOS mIoU/mAcc, novel-view object mIoU, object PSNR in a padded box.

Inputs may be numpy arrays or torch tensors (any device); masks are binary with nonzero meaning
foreground. Everything is vectorized numpy. Mismatched shapes and empty (zero-size) inputs raise
`ValueError`. Conventions:

- IoU of two empty masks is 1.0 (the prediction is exactly right), so averages stay defined.
- Boundary IoU (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
  Evaluation", CVPR 2021): the IoU of the two masks' boundary regions, a mask's boundary region
  being its pixels within ``d`` of its contour, ``d`` = 2% of the image diagonal (at least 1 px).
  Distances are chessboard (8-neighbour) distances to the nearest pixel outside the mask, and the
  image border counts as contour, as in the authors' reference (``d`` erosions by a 3x3 square of
  the mask padded with background). Errors far inside a large object do not count; errors along
  its contour count as much as the contour is long.
- NVOS (as in its evaluation and the papers that report it): per image, mIoU = TP / (TP + FP + FN)
  and mAcc = (TP + TN) / all pixels (pixel accuracy, not class-balanced); both are then averaged
  over the images (mean of per-image values, not pooled pixel counts).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage

ArrayLike = Union[np.ndarray, torch.Tensor]


def _numpy(x: ArrayLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _pair(a: ArrayLike, b: ArrayLike, names: Tuple[str, str]) -> Tuple[np.ndarray, np.ndarray]:
    a, b = _numpy(a, names[0]), _numpy(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} has shape {a.shape} but {names[1]} has shape {b.shape}")
    return a, b


def _stack_masks(masks: Union[ArrayLike, Sequence[ArrayLike]], name: str) -> np.ndarray:
    """[H, W], [B, H, W] or a sequence of [H, W] masks as bool [B, H, W]."""
    if isinstance(masks, (list, tuple)):
        if not masks:
            raise ValueError(f"{name} is empty")
        arrays = [_numpy(m, name) for m in masks]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"{name} have different shapes {sorted(shapes)}")
        arr = np.stack(arrays)
    else:
        arr = _numpy(masks, name)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [H, W] or [B, H, W] masks, got shape {arr.shape}")
    return arr != 0


def mask_bbox(mask: ArrayLike, pad: int = 0) -> Optional[Tuple[int, int, int, int]]:
    """Box (top, left, bottom, right) of a mask [H, W], ends exclusive, grown by `pad` px and clipped.

    `image[top:bottom, left:right]` is the box. None if the mask is all background.
    """
    m = _numpy(mask, "mask") != 0
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {m.shape}")
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    h, w = m.shape
    top, left, bottom, right = int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1
    return max(top - pad, 0), max(left - pad, 0), min(bottom + pad, h), min(right + pad, w)


def mask_iou(pred: ArrayLike, gt: ArrayLike) -> float:
    """Intersection over union of two binary masks of the same shape (1.0 if both are empty)."""
    p, g = _pair(pred, gt, ("pred", "gt"))
    p, g = p != 0, g != 0
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def boundary_width(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """``d`` of boundary IoU: ``dilation_ratio`` of the image diagonal, rounded, at least 1 px."""
    return max(1, int(round(dilation_ratio * math.hypot(height, width))))


def mask_boundary(mask: ArrayLike, d: int) -> np.ndarray:
    """Pixels of `mask` [H, W] within chessboard distance `d` of a pixel outside it or of the image
    border (the contour band of boundary IoU). [H, W] bool"""
    m = _numpy(mask, "mask") != 0
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {m.shape}")
    if d < 1:
        raise ValueError(f"boundary width d must be >= 1, got {d}")
    inside = ndimage.distance_transform_cdt(np.pad(m, 1), metric="chessboard")[1:-1, 1:-1]  # [H, W]
    return m & (inside <= d)


def boundary_iou(pred: ArrayLike, gt: ArrayLike, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU of two binary masks [H, W]: IoU of their contour bands of width
    ``boundary_width(H, W, dilation_ratio)`` (1.0 if both masks are empty)."""
    p, g = _pair(pred, gt, ("pred", "gt"))
    if p.ndim != 2:
        raise ValueError(f"masks must be [H, W], got shape {p.shape}")
    d = boundary_width(*p.shape, dilation_ratio)
    return mask_iou(mask_boundary(p, d), mask_boundary(g, d))


def nvos_metrics(preds: Union[ArrayLike, Sequence[ArrayLike]], gts: Union[ArrayLike, Sequence[ArrayLike]]) -> Dict:
    """NVOS foreground metrics over images: {"miou", "macc", "iou" [B], "acc" [B]}.

    `preds`, `gts`: one mask [H, W], a stack [B, H, W], or a list of [H, W] masks (same size).
    Per image: IoU = TP / (TP + FP + FN) (1.0 when both masks are empty), accuracy = (TP + TN) / (H W);
    mIoU and mAcc are their means over the images.
    """
    p, g = _stack_masks(preds, "preds"), _stack_masks(gts, "gts")  # [B, H, W]
    if p.shape != g.shape:
        raise ValueError(f"preds have shape {p.shape} but gts have shape {g.shape}")
    tp = (p & g).sum(axis=(1, 2))  # [B]
    union = (p | g).sum(axis=(1, 2))  # [B] = TP + FP + FN
    correct = (p == g).sum(axis=(1, 2))  # [B] = TP + TN
    iou = np.where(union > 0, tp / np.maximum(union, 1), 1.0)
    acc = correct / (p.shape[1] * p.shape[2])
    return {"miou": float(iou.mean()), "macc": float(acc.mean()), "iou": iou, "acc": acc}


def object_miou(
    pred_labels: ArrayLike,
    gt_labels: ArrayLike,
    matches: Optional[Mapping[int, int]] = None,
    background: int = 0,
) -> Dict:
    """Novel-view 2D segmentation mIoU over ground-truth objects: {"miou", "per_object", "matches"}.

    Args:
        pred_labels, gt_labels: Integer label maps [H, W] or [V, H, W] (V views of one scene).
        matches: GT id -> predicted id. If None, each GT object takes the predicted id (other than
            `background`) with the highest IoU over all views pooled, one id for all views.
        background: Label that is not an object in either map.

    An object's IoU is the mean of its per-view IoUs with the matched prediction over the views
    where the object is visible in the GT (predictions in views without it are not counted); an
    object without a match (no prediction) scores 0. mIoU is the mean over GT objects.
    """
    pred, gt = _pair(pred_labels, gt_labels, ("pred_labels", "gt_labels"))
    if pred.dtype.kind not in "iub" or gt.dtype.kind not in "iub":
        raise ValueError("label maps must be integer arrays")
    if pred.ndim == 2:
        pred, gt = pred[None], gt[None]
    if pred.ndim != 3:
        raise ValueError(f"label maps must be [H, W] or [V, H, W], got shape {pred.shape}")
    gt_ids, gt_idx = np.unique(gt, return_inverse=True)
    pred_ids, pred_idx = np.unique(pred, return_inverse=True)
    num_views, num_gt, num_pred = pred.shape[0], len(gt_ids), len(pred_ids)
    view_idx = np.repeat(np.arange(num_views), pred[0].size)
    flat = (view_idx * num_gt + gt_idx.reshape(-1)) * num_pred + pred_idx.reshape(-1)
    counts = np.bincount(flat, minlength=num_views * num_gt * num_pred).reshape(num_views, num_gt, num_pred)
    gt_area, pred_area = counts.sum(axis=2), counts.sum(axis=1)  # [V, G], [V, P]

    if matches is None:
        inter = counts.sum(axis=0)  # [G, P]
        union = gt_area.sum(axis=0)[:, None] + pred_area.sum(axis=0)[None, :] - inter
        pooled = np.where(pred_ids[None, :] == background, -1.0, inter / np.maximum(union, 1))
        best = pooled.argmax(axis=1)  # [G]
        match_idx = {g: int(best[g]) for g in range(num_gt) if pooled[g, best[g]] > 0}
    else:
        where = {int(i): k for k, i in enumerate(pred_ids)}
        match_idx = {g: where[matches[int(i)]] for g, i in enumerate(gt_ids) if matches.get(int(i)) in where}

    per_object, matched = {}, {}
    for g, gt_id in enumerate(gt_ids.tolist()):
        if gt_id == background:
            continue
        p = match_idx.get(g)
        matched[gt_id] = None if p is None else int(pred_ids[p])
        if p is None:
            per_object[gt_id] = 0.0
            continue
        visible = gt_area[:, g] > 0  # [V]
        inter_v = counts[visible, g, p]
        union_v = gt_area[visible, g] + pred_area[visible, p] - inter_v
        per_object[gt_id] = float((inter_v / union_v).mean())
    if not per_object:
        raise ValueError("gt_labels contain no object (only background)")
    return {"miou": float(np.mean(list(per_object.values()))), "per_object": per_object, "matches": matched}


def box_psnr(
    pred_rgb: ArrayLike,
    gt_rgb: ArrayLike,
    gt_mask: ArrayLike,
    pred_mask: Optional[ArrayLike] = None,
    pad: int = 10,
    background: Union[float, Sequence[float]] = 0.0,
    data_range: float = 1.0,
) -> float:
    """PSNR of an object rendering against the GT object, inside the GT mask's box padded by `pad` px.

    Args:
        pred_rgb: Rendering of the selected object [H, W, C]; pixels outside `pred_mask` (if given)
            are replaced by `background` (e.g. mask = rendered `rgb.sum(-1) > 0` or alpha > 0.5).
        gt_rgb: Ground-truth image [H, W, C]; pixels outside `gt_mask` become `background`.
        gt_mask: GT object mask [H, W]; must not be empty.
        background: Background colour (scalar or per channel), in the units of `data_range`.

    Returns +inf for a perfect match.
    """
    pred, gt = _pair(pred_rgb, gt_rgb, ("pred_rgb", "gt_rgb"))
    if pred.ndim != 3:
        raise ValueError(f"images must be [H, W, C], got shape {pred.shape}")
    gmask = _numpy(gt_mask, "gt_mask") != 0
    if gmask.shape != pred.shape[:2]:
        raise ValueError(f"gt_mask has shape {gmask.shape}, images have {pred.shape[:2]}")
    bg = np.broadcast_to(np.asarray(background, dtype=np.float64), pred.shape[2:])
    gt = np.where(gmask[..., None], gt, bg)
    if pred_mask is not None:
        pmask = _numpy(pred_mask, "pred_mask") != 0
        if pmask.shape != pred.shape[:2]:
            raise ValueError(f"pred_mask has shape {pmask.shape}, images have {pred.shape[:2]}")
        pred = np.where(pmask[..., None], pred, bg)
    box = mask_bbox(gmask, pad)
    if box is None:
        raise ValueError("gt_mask is empty: no box to evaluate in")
    top, left, bottom, right = box
    err = pred[top:bottom, left:right].astype(np.float64) - gt[top:bottom, left:right]
    mse = float(np.mean(err**2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))
