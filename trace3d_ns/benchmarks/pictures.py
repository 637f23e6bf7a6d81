"""Pictures of 3D object extraction against the ground truth (the ablation's one picture per variant).

One row per object, three panels cropped around the object's amodal ground truth on one test view:
the test image with the ground-truth outline of the object alone (green), the selected Gaussians
rendered alone over black, and the silhouettes compared (grey: both, red: extracted but not the
object, blue: the object but not extracted). The caption gives the view's IoU and boundary IoU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from trace3d_ns.evaluation.ground_truth import View
from trace3d_ns.evaluation.metrics import boundary_iou, mask_bbox, mask_boundary, mask_iou

ROLE_ORDER = ("leaning", "thin", "stacked", "ground")
"""Objects shown first: one of each placement (the harder boundaries first), then the largest."""
PANEL = 128
"""Side of each panel in pixels."""
CAPTION = 14
TP, FP, FN = (200, 200, 200), (230, 40, 40), (40, 90, 240)
OUTLINE = (40, 230, 60)


def picture_subjects(test: Sequence[View], meta: Dict, count: int) -> Tuple[View, List[int]]:
    """The test view with the most objects in frame (ties: the first) and up to ``count`` of its
    objects: the largest (amodal area) of each role in ``ROLE_ORDER``, then the largest others.
    Depends on the ground truth only, so every variant shows the same."""
    with_amodal = [v for v in test if v.amodal]
    if not with_amodal:
        raise ValueError("pictures need amodal ground truth (gt_amodal/) on the test views")
    view = max(with_amodal, key=lambda v: sum(bool(m.any()) for m in v.amodal.values()))
    area = {i: int(m.sum()) for i, m in view.amodal.items() if m.any()}
    role = {o["id"]: o.get("role", "ground") for o in meta["objects"]}
    by_size = sorted(area, key=lambda i: (-area[i], i))
    chosen: List[int] = []
    for r in ROLE_ORDER:
        pick = next((i for i in by_size if role.get(i) == r and i not in chosen), None)
        if pick is not None and len(chosen) < count:
            chosen.append(pick)
    chosen += [i for i in by_size if i not in chosen][: count - len(chosen)]
    return view, chosen


def _crop_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """A square (top, left, bottom, right) around the mask, padded by 20% + 4 px, inside the image."""
    top, left, bottom, right = mask_bbox(mask)
    h, w = mask.shape
    side = int(max(bottom - top, right - left) * 1.4) + 8
    side = min(side, h, w)
    cy, cx = (top + bottom) // 2, (left + right) // 2
    top, left = min(max(cy - side // 2, 0), h - side), min(max(cx - side // 2, 0), w - side)
    return top, left, top + side, left + side


def _panel(rgb: np.ndarray, box: Tuple[int, int, int, int]) -> Image.Image:
    top, left, bottom, right = box
    return Image.fromarray(rgb[top:bottom, left:right]).resize((PANEL, PANEL), Image.NEAREST)


def comparison_rgb(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Silhouettes compared: both grey, prediction only red, ground truth only blue, neither black. [H, W, 3] uint8"""
    out = np.zeros((*gt.shape, 3), dtype=np.uint8)
    out[pred & gt], out[pred & ~gt], out[~pred & gt] = TP, FP, FN
    return out


def extraction_picture(model, train: Sequence[View], view: View, ids: Sequence[int], settings, out: Path,
                       title: str = "") -> List[Dict]:
    """Write the picture of ``ids`` on test ``view`` (selections as ``trace3d-eval`` makes them with
    ``settings``) to ``out``; returns each row's object id, IoU and boundary IoU."""
    from trace3d_ns.evaluation.harness import reference_view, render_subset_rgb, select, silhouette

    image = (view.image.cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)  # [H, W, 3]
    rows, scores = [], []
    for object_id in ids:
        gt = view.amodal[object_id]
        masks = [v.gt == object_id for v in train]
        sel = select(model, train, reference_view(masks), masks, 1, settings)
        pred = silhouette(model, view.camera, sel.mask)
        rgb = (render_subset_rgb(model, view.camera, sel.mask).cpu().numpy() * 255.0).round().astype(np.uint8)
        outlined = image.copy()
        outlined[mask_boundary(gt, 1)] = OUTLINE
        box = _crop_box(gt)
        iou, biou = mask_iou(pred, gt), boundary_iou(pred, gt)
        scores.append({"object": int(object_id), "iou": iou, "biou": biou})
        row = Image.new("RGB", (3 * PANEL + 4, PANEL + CAPTION), (255, 255, 255))
        ImageDraw.Draw(row).text((2, 1), f"object {object_id}: IoU {iou:.3f}  boundary IoU {biou:.3f}", fill=(0, 0, 0))
        for k, panel in enumerate((outlined, rgb, comparison_rgb(pred, gt))):
            row.paste(_panel(panel, box), (k * (PANEL + 2), CAPTION))
        rows.append(row)
    header = Image.new("RGB", (3 * PANEL + 4, CAPTION * 2), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    draw.text((2, 1), f"{title}  {view.name}", fill=(0, 0, 0))
    draw.text((2, CAPTION), "GT (object alone, green) | extracted, alone | grey both, red extra, blue missed", fill=(0, 0, 0))
    picture = Image.new("RGB", (header.width, header.height + sum(r.height for r in rows)), (255, 255, 255))
    picture.paste(header, (0, 0))
    for k, row in enumerate(rows):
        picture.paste(row, (0, header.height + k * row.height))
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    return scores
