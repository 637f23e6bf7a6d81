"""Consistency scores on hand-made maps."""

from __future__ import annotations

import torch

from trace3d_ns.git.consistency import consistency_scores, raw_patch_ids


def _gt() -> list[torch.Tensor]:
    a = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0]])
    b = torch.tensor([[0, 2, 2, 0], [1, 1, 2, 0], [1, 1, 0, 0]])
    return [a, b]


def test_perfect_and_relabelled_maps_score_one():
    gt = _gt()
    assert consistency_scores(gt, gt).mean_best_iou == 1.0
    relabelled = [torch.where(g > 0, 10 - g, torch.zeros_like(g)) for g in gt]  # ids 9 and 8
    scores = consistency_scores(relabelled, gt)
    assert scores.mean_best_iou == 1.0 and abs(scores.ari - 1.0) < 1e-12 and scores.mean_view_iou == 1.0
    assert scores.object_iou == {1: 1.0, 2: 1.0}


def test_object_split_across_views_scores_below_one():
    gt = _gt()
    pred = [gt[0].clone(), torch.where(gt[1] == 1, torch.full_like(gt[1], 5), gt[1])]  # object 1 changes id
    scores = consistency_scores(pred, gt)
    assert scores.object_iou[2] == 1.0
    assert abs(scores.object_iou[1] - 4 / 8) < 1e-12  # best single id covers 4 of its 8 pixels
    assert scores.mean_best_iou < 1.0 and scores.ari < 1.0
    assert scores.mean_view_iou == 1.0  # each view on its own is perfect


def test_raw_patches_have_no_cross_view_identity():
    gt = _gt()
    raw = raw_patch_ids(gt)
    assert raw[0].tolist() == gt[0].tolist()
    assert raw[1].max() == 4 and torch.equal(raw[1] == 0, gt[1] == 0)  # offset by view 0's max id
    scores = consistency_scores(raw, gt)
    assert scores.mean_view_iou == 1.0 and scores.mean_best_iou < 0.6
    # Merging object 2 into background in the prediction lowers its IoU.
    under = [torch.where(g == 2, torch.zeros_like(g), g) for g in gt]
    assert consistency_scores(under, gt).object_iou[2] == 0.0
