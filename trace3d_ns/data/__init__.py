"""Data side of trace3d-ns: 2D instance masks -> per-image patch maps for training.

Modules (import them directly; this package stays import-light):

- ``patches``: masks [K, H, W] -> disjoint patch map [H, W]; nearest downscaling of patch maps.
- ``mask_sources``: the ``sam`` / ``folder`` / ``superpixel`` mask sources and their configs, and the
  base the SAM-family sources share.
- ``sam2_source``: the ``sam2`` (SAM 2.1) mask source; the ``sam2`` package is an optional extra.
- ``levels``: the weights-free ``levels`` mask source (one Felzenszwalb level drawn per view).
- ``mask_cache``: the on-disk cache of per-image integer maps (patches, consistent maps, ...).
- ``datamanager``: ``Trace3DDataManagerConfig`` / ``Trace3DDataManager`` serving ``data["patches"]``.
- ``bench_masks``: ``run_masks_benchmark`` (compute vs cached-load timing).
"""
