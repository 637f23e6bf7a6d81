"""Evaluation metrics for lifted segmentation (NVOS, novel-view object mIoU, object PSNR)."""

from trace3d_ns.evaluation.metrics import box_psnr, mask_bbox, mask_iou, nvos_metrics, object_miou

__all__ = ["box_psnr", "mask_bbox", "mask_iou", "nvos_metrics", "object_miou"]
