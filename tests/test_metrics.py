"""Evaluation metrics on hand-made masks whose values are worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trace3d_ns.evaluation.metrics import (
    box_psnr,
    boundary_iou,
    boundary_width,
    mask_bbox,
    mask_boundary,
    mask_iou,
    nvos_metrics,
    object_miou,
)


def masks_a() -> tuple[np.ndarray, np.ndarray]:
    """4x4: pred = top-left 2x2 (4 px), gt = rows 0-1, cols 1-3 (6 px); TP 2, FP 2, FN 4, TN 8."""
    pred = np.zeros((4, 4), bool)
    pred[:2, :2] = True
    gt = np.zeros((4, 4), bool)
    gt[:2, 1:] = True
    return pred, gt


def test_mask_iou():
    pred, gt = masks_a()
    assert mask_iou(pred, gt) == pytest.approx(2 / 8)
    assert mask_iou(torch.from_numpy(gt).int(), gt) == 1.0
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    with pytest.raises(ValueError, match="shape"):
        mask_iou(pred, gt[:3])
    with pytest.raises(ValueError, match="empty"):
        mask_iou(np.zeros((0, 4)), np.zeros((0, 4)))


def test_nvos_metrics_per_image_then_mean():
    pred_a, gt_a = masks_a()  # IoU 2/8, accuracy (2 + 8) / 16
    pred_b = np.zeros((4, 4), bool)
    gt_b = np.zeros((4, 4), bool)
    gt_b[3, 3] = True  # missed: IoU 0, accuracy 15/16
    result = nvos_metrics([torch.from_numpy(pred_a), pred_b], [gt_a, gt_b])
    assert result["iou"].tolist() == pytest.approx([0.25, 0.0])
    assert result["miou"] == pytest.approx(0.125)  # pooled counts would give 2/9
    assert result["macc"] == pytest.approx((0.625 + 0.9375) / 2)
    stacked = nvos_metrics(np.stack([pred_a, pred_b]), np.stack([gt_a, gt_b]))
    assert stacked["miou"] == result["miou"] and stacked["macc"] == result["macc"]
    assert nvos_metrics(pred_a, gt_a)["macc"] == pytest.approx(0.625)
    with pytest.raises(ValueError, match="shape"):
        nvos_metrics([pred_a], [gt_a, gt_b])
    with pytest.raises(ValueError, match="different shapes"):
        nvos_metrics([pred_a, pred_a[:2]], [gt_a, gt_a[:2]])
    with pytest.raises(ValueError, match="empty"):
        nvos_metrics([], [])


def two_views() -> tuple[np.ndarray, np.ndarray]:
    """GT objects 1 and 2 (2 absent from view 1); predictions 7 (~object 1) and 9 (~object 2)."""
    gt = np.array([[[1, 1, 2, 2], [0, 0, 2, 2]], [[1, 1, 0, 0], [1, 1, 0, 0]]])
    pred = np.array([[[7, 7, 7, 9], [0, 0, 9, 9]], [[7, 7, 0, 0], [7, 0, 0, 0]]])
    return pred, gt


def test_object_miou_best_match():
    pred, gt = two_views()
    result = object_miou(pred, gt)
    # Pooled IoU picks 1 -> 7 (5/7 vs 0) and 2 -> 9 (3/4 vs 1/9).
    assert result["matches"] == {1: 7, 2: 9}
    # Object 1: view 0 inter 2 / union 3, view 1 inter 3 / union 4. Object 2: view 0 only, 3/4.
    assert result["per_object"][1] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert result["per_object"][2] == pytest.approx(3 / 4)
    assert result["miou"] == pytest.approx(35 / 48)


def test_object_miou_given_matches_and_unmatched():
    pred, gt = two_views()
    result = object_miou(torch.from_numpy(pred), torch.from_numpy(gt), matches={1: 9, 2: 9})
    assert result["per_object"] == pytest.approx({1: 0.0, 2: 0.75})
    absent = object_miou(pred, gt, matches={2: 42})  # 1 has no match, 42 is never predicted
    assert absent["matches"] == {1: None, 2: None} and absent["miou"] == 0.0
    only_background = object_miou(np.zeros((2, 2), int), np.full((2, 2), 5))
    assert only_background["matches"] == {5: None} and only_background["miou"] == 0.0
    with pytest.raises(ValueError, match="no object"):
        object_miou(pred, np.zeros_like(gt))
    with pytest.raises(ValueError, match="integer"):
        object_miou(pred.astype(float), gt)


def test_mask_bbox():
    mask = np.zeros((20, 20), bool)
    mask[5:7, 5:7] = True
    assert mask_bbox(mask) == (5, 5, 7, 7)
    assert mask_bbox(mask, pad=2) == (3, 3, 9, 9)
    corner = np.zeros((20, 20), bool)
    corner[0, 19] = True
    assert mask_bbox(corner, pad=10) == (0, 9, 11, 20)
    assert mask_bbox(np.zeros((4, 4))) is None


def test_box_psnr():
    gt_mask = np.zeros((20, 20), bool)
    gt_mask[5:7, 5:7] = True  # box with pad 2: rows and cols 3..8, 36 px
    gt_rgb = np.full((20, 20, 3), 0.5)  # outside the object it counts as black
    pred = np.zeros((20, 20, 3))
    pred[5:7, 5:7] = 0.5
    pred[15, 15] = 1.0  # outside the box: ignored
    assert box_psnr(pred, gt_rgb, gt_mask, pad=2) == math.inf
    pred[3, 3] = 0.5  # a stray rendered pixel in the box: squared error 3 * 0.25 over 108 values
    assert box_psnr(pred, gt_rgb, gt_mask, pad=2) == pytest.approx(10 * math.log10(144))
    rendered = np.zeros((20, 20), bool)
    rendered[5:7, 5:7] = True  # the stray pixel is outside the rendered object: background
    assert box_psnr(torch.from_numpy(pred), gt_rgb, gt_mask, pred_mask=rendered, pad=2) == math.inf
    white = np.where(gt_mask[..., None], 0.5, np.ones((20, 20, 3)))  # rendered on white
    assert box_psnr(white, gt_rgb, gt_mask, pad=2, background=1.0) == math.inf
    with pytest.raises(ValueError, match="gt_mask is empty"):
        box_psnr(pred, gt_rgb, np.zeros((20, 20), bool))
    with pytest.raises(ValueError, match="shape"):
        box_psnr(pred, gt_rgb[:10], gt_mask)
    with pytest.raises(ValueError, match="gt_mask has shape"):
        box_psnr(pred, gt_rgb, gt_mask[:10])


def _block(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[rows, cols] = True
    return mask


def test_boundary_width_is_two_percent_of_the_diagonal():
    assert boundary_width(10, 10) == 1  # 0.28 px: at least 1
    assert boundary_width(100, 100) == 3  # 2.83
    assert boundary_width(160, 160) == 5  # 4.53
    assert boundary_width(300, 400) == 10  # diagonal 500


def test_boundary_band_of_a_square_and_of_the_image_border():
    square = _block(100, 100, slice(20, 60), slice(20, 60))  # 40 x 40
    band = mask_boundary(square, 3)
    assert band.sum() == 40 * 40 - 34 * 34  # a ring 3 px wide
    assert band[20:23, 20:60].all() and not band[23:57, 23:57].any()
    full = mask_boundary(np.ones((10, 12), bool), 1)  # the image border is contour
    assert full.sum() == 10 * 12 - 8 * 10 and not full[1:-1, 1:-1].any()
    assert not mask_boundary(np.zeros((5, 5), bool), 1).any()
    with pytest.raises(ValueError, match="d must be"):
        mask_boundary(square, 0)


def test_boundary_iou_on_hand_made_masks():
    # 10 x 10 image: d = 1. GT = rows 2-7, cols 2-7 (6 x 6); its ring: 36 - 16 = 20 px.
    gt = _block(10, 10, slice(2, 8), slice(2, 8))
    assert boundary_iou(gt, gt) == 1.0
    # Shifted one column right (cols 3-8), ring 20 px. Shared ring pixels: rows 2 and 7 at cols 3-7
    # (10 px); GT's side col 7 and the shift's side col 3 lie inside the other square. 10 / (20 + 20 - 10).
    shifted = _block(10, 10, slice(2, 8), slice(3, 9))
    assert boundary_iou(shifted, gt) == pytest.approx(1 / 3)
    assert mask_iou(shifted, gt) == pytest.approx(30 / 42)  # the area IoU hides what the contour shows
    # A hole far inside (100 x 100 image: d = 3) costs area IoU for its area, boundary IoU only for
    big = _block(100, 100, slice(10, 90), slice(10, 90))
    holed = big & ~_block(100, 100, slice(40, 60), slice(40, 60))
    assert mask_iou(holed, big) == pytest.approx(1 - 400 / 6400)
    # its own contour band: the mask pixels in the 3 px ring around it, 26^2 - 20^2.
    outer = 80 * 80 - 74 * 74
    assert boundary_iou(holed, big) == pytest.approx(outer / (outer + 26 * 26 - 20 * 20))
    assert boundary_iou(np.zeros((10, 10), bool), np.zeros((10, 10), bool)) == 1.0
    assert boundary_iou(np.zeros((10, 10), bool), gt) == 0.0
    assert boundary_iou(torch.from_numpy(gt), gt.astype(np.uint8)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        boundary_iou(gt, gt[:5])
