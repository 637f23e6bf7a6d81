"""Gaussian-splat export: ns-export-compatible PLY (vectorized) and per-instance segmented export."""

from trace3d_ns.export.ply import SplatTable, gaussian_params_from_ply, read_ply, write_gaussian_ply, write_ply
from trace3d_ns.export.segmented import export_segmented, instance_labels_from_model

__all__ = [
    "SplatTable",
    "export_segmented",
    "gaussian_params_from_ply",
    "instance_labels_from_model",
    "read_ply",
    "write_gaussian_ply",
    "write_ply",
]
