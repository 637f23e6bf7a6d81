"""Evaluation metrics for lifted segmentation (NVOS, novel-view object mIoU, boundary IoU, object PSNR)."""

from trace3d_ns.evaluation.metrics import (
    box_psnr,
    boundary_iou,
    mask_bbox,
    mask_boundary,
    mask_iou,
    nvos_metrics,
    object_miou,
)

__all__ = ["box_psnr", "boundary_iou", "mask_bbox", "mask_boundary", "mask_iou", "nvos_metrics", "object_miou"]
