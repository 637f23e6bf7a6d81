"""Full-image datamanager that also serves per-image instance patch maps.

On top of nerfstudio's ``FullImageDatamanager`` it

1. computes 2D instance masks for every *training* image from the cached, already undistorted
   image (so patches align pixel for pixel with what splatfacto trains on),
2. turns them into a disjoint patch map (:func:`trace3d_ns.data.patches.masks_to_patches`), and
3. stores it in each cached train dict under ``"patches"`` (int32 [H, W], CPU), so
   ``next_train`` returns it as ``data["patches"]``. It is deliberately *not* ``"mask"``:
   splatfacto multiplies its loss by ``batch["mask"]``. Beside it, ``"patch_alike"`` (bool
   [T + 1, T + 1], :func:`trace3d_ns.data.patches.patch_mask_alike`): which of the image's patches
   one mask covers together (absent for patch maps from a cache written without it).

Masks are computed only when the datamanager is set up for training (``test_mode="val"``, which
is what ``ns-train`` uses); ``ns-viewer`` ("test") and ``ns-export`` ("inference") never compute
them. Results are cached on disk (:mod:`trace3d_ns.data.mask_cache`).

Choosing the mask source on the command line::

    ns-train trace3d --pipeline.datamanager.mask-source sam \
        --pipeline.datamanager.sam.checkpoint ~/ckpt/sam_vit_h_4b8939.pth ...
    ns-train trace3d --pipeline.datamanager.mask-source sam2 \
        --pipeline.datamanager.sam2.checkpoint ~/ckpt/sam2.1_hiera_large.pt ...
    ns-train trace3d --pipeline.datamanager.mask-source folder \
        --pipeline.datamanager.folder.directory sam_masks ...
    ns-train trace3d --pipeline.datamanager.mask-source levels ...
    ns-train trace3d --pipeline.datamanager.mask-source superpixel ...
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Type, Union, get_args

import numpy as np
import torch

from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from trace3d_ns.device import require_device
from trace3d_ns.data.levels import LevelsMaskSourceConfig
from trace3d_ns.data.mask_cache import MapCache, compute_maps, stable_hash
from trace3d_ns.data.mask_sources import (
    FolderMaskSourceConfig,
    MaskSource,
    MaskSourceError,
    MaskSourceName,
    SamMaskSourceConfig,
    SuperpixelMaskSourceConfig,
    as_rgb_uint8,
    file_digest,
    make_mask_source,
)
from trace3d_ns.data.sam2_source import Sam2MaskSourceConfig
from trace3d_ns.data.patches import SmallPatchPolicy, masks_to_patches, patch_mask_alike

PATCHES_KIND = "patches"
"""Cache kind of the patch maps."""
ALIKE_KIND = "patch_alike"
"""Cache kind of each patch map's ``patch_mask_alike`` matrix (same key as the patch maps)."""
PATCH_FORMAT = 1
"""Bumped when the patching algorithm changes in a way that changes its output."""


class EmptyMasksWarning(UserWarning):
    """A training image got no masks; its patch map is all background."""


@dataclass
class Trace3DDataManagerConfig(FullImageDatamanagerConfig):
    """FullImageDatamanager + per-image instance patch maps for the training images."""

    _target: Type = field(default_factory=lambda: Trace3DDataManager)
    mask_source: MaskSourceName = "sam"
    """Where the 2D instance masks come from: sam (needs a checkpoint, see --pipeline.datamanager.sam.*),
    sam2 (SAM 2.1: the sam2 extra and a checkpoint, see --pipeline.datamanager.sam2.*), folder
    (precomputed, see --pipeline.datamanager.folder.*), levels (weights-free, one Felzenszwalb
    level drawn per view: whole objects in some views) or superpixel (weights-free, the same scales
    in every view: parts)."""
    sam: SamMaskSourceConfig = field(default_factory=SamMaskSourceConfig)
    """Settings of the sam source (used when mask_source is sam)."""
    sam2: Sam2MaskSourceConfig = field(default_factory=Sam2MaskSourceConfig)
    """Settings of the sam2 source (used when mask_source is sam2)."""
    folder: FolderMaskSourceConfig = field(default_factory=FolderMaskSourceConfig)
    """Settings of the folder source (used when mask_source is folder)."""
    superpixel: SuperpixelMaskSourceConfig = field(default_factory=SuperpixelMaskSourceConfig)
    """Settings of the superpixel source (used when mask_source is superpixel)."""
    levels: LevelsMaskSourceConfig = field(default_factory=LevelsMaskSourceConfig)
    """Settings of the levels source (used when mask_source is levels)."""
    min_patch_area: int = 64
    """Patches with fewer pixels than this are handled by small_patch_policy (0 disables)."""
    small_patch_policy: SmallPatchPolicy = "merge"
    """merge: absorb a small patch into the neighbour sharing the most boundary; background: set it to 0."""
    use_cache: bool = True
    """Cache patch maps on disk and reuse them while images and settings are unchanged."""
    cache_dir: Optional[Path] = None
    """Cache folder; None means <data dir>/.trace3d_cache (or a per-user folder if the data is read-only)."""


class Trace3DDataManager(FullImageDatamanager):
    """Serves ``data["patches"]`` (int32 [H, W], CPU) with every training image.

    Args:
        config: the config.
        device, test_mode, world_size, local_rank: as for ``FullImageDatamanager``.
        mask_source: a ready :class:`MaskSource` to use instead of building one from the config
            (a seam for tests and scripts).
    """

    config: Trace3DDataManagerConfig

    def __init__(
        self,
        config: Trace3DDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        mask_source: Optional[MaskSource] = None,
        **kwargs: Any,
    ) -> None:
        require_device(device)
        self._injected_mask_source = mask_source
        self._patches_key: Optional[str] = None
        self._image_stamps: Optional[List[str]] = None
        self._mask_cache: Optional[MapCache] = None
        super().__init__(
            config=config, device=device, test_mode=test_mode, world_size=world_size, local_rank=local_rank, **kwargs
        )
        self.computes_patches: bool = test_mode == "val"
        """Patch maps are built only when set up for training (ns-train uses test_mode="val")."""
        # Undistortion in _load_images overwrites the train cameras' intrinsics; keep the originals to
        # undistort masks given on the raw images (folder source).
        self._raw_train_cameras: Cameras = deepcopy(self.train_dataset.cameras)

    # ---------------------------------------------------------------------------------------------
    # Public API for later stages
    # ---------------------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The scene's data directory."""
        data = Path(self.config.dataparser.data)
        return data.parent if data.is_file() else data

    def train_image_names(self) -> List[str]:
        """Training image file names in training-index order (relative to the data dir when inside it)."""
        names = []
        base = self.data_dir.resolve()
        for path in self.train_dataset.image_filenames:
            p = Path(path).resolve()
            try:
                names.append(p.relative_to(base).as_posix())
            except ValueError:
                names.append(str(p))
        return names

    @property
    def mask_cache(self) -> Optional[MapCache]:
        """The on-disk map cache (None if ``use_cache`` is off)."""
        if not self.config.use_cache:
            return None
        if self._mask_cache is None:
            self._mask_cache = MapCache.beside_data(self.config.dataparser.data, self.config.cache_dir)
        return self._mask_cache

    def train_patch_maps(self) -> List[torch.Tensor]:
        """Patch maps of the training images in training-index order: int32 [H, W] CPU tensors,
        0 = no mask. Triggers image caching and mask computation on first use."""
        if not self.computes_patches:
            raise RuntimeError(
                f"Patch maps are only built when the datamanager is set up for training (test_mode='val'), "
                f"not test_mode={self.test_mode!r}."
            )
        return [cache["patches"] for cache in self.cached_train]

    def train_patch_alike(self) -> List[Optional[np.ndarray]]:
        """Per training image, which of its patches one mask covers together ([T + 1, T + 1] uint8,
        ``patches.patch_mask_alike``: the batches' ``patch_alike``), or None where the patch maps came
        from a cache written without them."""
        self.train_patch_maps()  # computes or loads the patches (and these)
        return [c["patch_alike"].numpy().astype(np.uint8) if "patch_alike" in c else None for c in self.cached_train]

    def set_train_instance_maps(self, maps: Sequence[torch.Tensor]) -> None:
        """From now on every training batch also carries ``data["instances"]``: the image's consistent
        instance map (int32 [H, W], same layout as ``patches``, global ids, 0 = none)."""
        if len(maps) != len(self.cached_train):
            raise ValueError(f"expected {len(self.cached_train)} instance maps, got {len(maps)}")
        for cache, instance_map in zip(self.cached_train, maps):
            if tuple(instance_map.shape) != tuple(cache["patches"].shape):
                raise ValueError(f"instance map of shape {tuple(instance_map.shape)} for patches {tuple(cache['patches'].shape)}")
            cache["instances"] = instance_map.detach().to("cpu", torch.int32)

    def train_image_stamps(self) -> List[str]:
        """One content stamp per training image (hash of the file bytes), in training order."""
        if self._image_stamps is None:
            self._image_stamps = [file_digest(Path(p)) for p in self.train_dataset.image_filenames]
        return self._image_stamps

    def train_maps_key(self, kind: str, settings: Mapping[str, Any]) -> str:
        """Cache key for per-training-image maps of ``kind`` derived from the patch maps (e.g. the
        consistent instance maps): it covers the images, the patch settings and ``settings``."""
        self.train_patch_maps()  # make sure the patch key exists
        return MapCache.make_key(
            kind, self.train_image_names(), self.train_image_stamps(), {"patches": self._patches_key, **settings}
        )

    def save_train_maps(self, kind: str, maps: Sequence[Union[np.ndarray, torch.Tensor]], settings: Mapping[str, Any]) -> Optional[Path]:
        """Store one [H, W] integer map per training image (training order) under ``kind``; e.g.
        ``save_train_maps("consistent", maps, {"merge_threshold": 0.5, "step": 30000})``.
        Returns the file written, or None when the cache is off."""
        if self.mask_cache is None:
            return None
        arrays = [m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m) for m in maps]
        return self.mask_cache.save_maps(kind, self.train_maps_key(kind, settings), self.train_image_names(), arrays)

    def load_train_maps(self, kind: str, settings: Mapping[str, Any]) -> Optional[List[torch.Tensor]]:
        """Maps stored by :meth:`save_train_maps` with the same settings (int32 CPU tensors), or None."""
        if self.mask_cache is None:
            return None
        shapes = [tuple(p.shape) for p in self.train_patch_maps()]
        maps = self.mask_cache.load_maps(
            kind, self.train_maps_key(kind, settings), names=self.train_image_names(), shapes=shapes
        )
        return None if maps is None else [torch.from_numpy(m) for m in maps]

    # ---------------------------------------------------------------------------------------------
    # Image caching
    # ---------------------------------------------------------------------------------------------

    def _load_images(
        self, split: Literal["train", "eval"], cache_images_device: Literal["cpu", "gpu"]
    ) -> List[Dict[str, torch.Tensor]]:
        if cache_images_device == "cpu" and not torch.cuda.is_available():
            # nerfstudio's "cpu" branch calls pin_memory(), which raises without a CUDA driver. Its "gpu"
            # branch with a CPU target device is the same thing minus the pinning.
            device = self.device
            self.device = "cpu"
            try:
                cached = super()._load_images(split, cache_images_device="gpu")
            finally:
                self.device = device
        else:
            cached = super()._load_images(split, cache_images_device=cache_images_device)
        if split == "train" and self.computes_patches:
            self._attach_patches(cached)
        return cached

    # ---------------------------------------------------------------------------------------------
    # Patch computation
    # ---------------------------------------------------------------------------------------------

    def _build_mask_source(self) -> MaskSource:
        if self._injected_mask_source is not None:
            return self._injected_mask_source
        configs = {name: getattr(self.config, name) for name in get_args(MaskSourceName)}
        return make_mask_source(self.config.mask_source, configs, device=self.device, data_dir=self.data_dir)

    def _patch_settings(self, source: MaskSource) -> Dict[str, Any]:
        cams = self._raw_train_cameras
        camera_digest = stable_hash(
            {
                "fx": cams.fx.flatten().tolist(),
                "fy": cams.fy.flatten().tolist(),
                "cx": cams.cx.flatten().tolist(),
                "cy": cams.cy.flatten().tolist(),
                "w": cams.width.flatten().tolist(),
                "h": cams.height.flatten().tolist(),
                "type": cams.camera_type.flatten().tolist(),
                "dist": None if cams.distortion_params is None else cams.distortion_params.tolist(),
            }
        )
        return {
            "format": PATCH_FORMAT,
            "source_name": self.config.mask_source if self._injected_mask_source is None else type(source).__name__,
            "source": source.cache_settings(),
            "min_patch_area": self.config.min_patch_area,
            "small_patch_policy": self.config.small_patch_policy,
            # Image preparation that changes the pixels the masks are computed from.
            "camera_res_scale_factor": self.config.camera_res_scale_factor,
            "cameras": camera_digest,
            "alpha_color": None
            if self.train_dataparser_outputs.alpha_color is None
            else self.train_dataparser_outputs.alpha_color.tolist(),
        }

    def _attach_patches(self, cached: List[Dict[str, torch.Tensor]]) -> None:
        paths = [Path(p) for p in self.train_dataset.image_filenames]
        names = self.train_image_names()
        shapes = [(int(c["image"].shape[0]), int(c["image"].shape[1])) for c in cached]
        source = self._build_mask_source()
        stamps = [f"{s}|{source.input_stamp(p)}" for s, p in zip(self.train_image_stamps(), paths)]
        settings = self._patch_settings(source)
        self._patches_key = MapCache.make_key(PATCHES_KIND, names, stamps, settings)

        checked = False
        alike: List[Optional[np.ndarray]] = [None] * len(cached)

        def compute(i: int) -> np.ndarray:
            nonlocal checked
            if not checked:
                source.check_inputs(paths)  # fail before any heavy work, and only on a cache miss
                source.prepare(paths)
                checked = True
            masks = self._masks_for_cached_image(source, i, cached[i]["image"], paths[i])  # [K, H, W]
            if masks.shape[1:] != shapes[i]:
                raise MaskSourceError(
                    f"Masks for image '{paths[i].name}' are {tuple(masks.shape[1:])} but the training image is {shapes[i]}"
                )
            if masks.shape[0] == 0:
                message = f"No masks for training image '{paths[i].name}': its patch map is all background (0)."
                CONSOLE.print(f"[bold yellow]Warning: {message}")
                warnings.warn(message, EmptyMasksWarning)
            patches = masks_to_patches(masks, self.config.min_patch_area, self.config.small_patch_policy)  # [H, W]
            alike[i] = patch_mask_alike(masks, patches)  # [T + 1, T + 1]
            return patches

        description = f"Computing {self.config.mask_source} masks / patches"
        try:
            cache = self.mask_cache
            if cache is not None:
                maps, hit = cache.get_or_compute(
                    PATCHES_KIND, self._patches_key, names, compute, shapes=shapes, description=description
                )
                if hit:
                    CONSOLE.log(f"Loaded {len(maps)} cached patch maps from {cache.path(PATCHES_KIND, self._patches_key)}")
                    alike = cache.load_maps(ALIKE_KIND, self._patches_key, names=names) or alike
                else:
                    cache.save_maps(ALIKE_KIND, self._patches_key, names, alike)
            else:
                maps = compute_maps(len(cached), compute, description)
        finally:
            if source is not self._injected_mask_source:
                source.close()
        for entry, patch_map, alike_map in zip(cached, maps, alike):
            entry["patches"] = torch.from_numpy(np.ascontiguousarray(patch_map, dtype=np.int32))  # [H, W] CPU
            if alike_map is not None and alike_map.shape[0] > int(patch_map.max(initial=0)):
                entry["patch_alike"] = torch.from_numpy(np.asarray(alike_map) > 0)  # [T + 1, T + 1] CPU

    def _masks_for_cached_image(
        self, source: MaskSource, idx: int, image: torch.Tensor, path: Path
    ) -> np.ndarray:
        """[K, H, W] bool masks aligned with the cached (undistorted) training image."""
        if not source.needs_raw_geometry:
            return source(as_rgb_uint8(image), path)
        camera = self._raw_train_cameras[idx].reshape(())
        raw_hw = (int(camera.height.item()), int(camera.width.item()))
        masks = source.load(path, expected_hw=raw_hw)  # [K, H, W] on the raw image
        if camera.distortion_params is None or torch.all(camera.distortion_params == 0):
            return masks
        return undistort_masks_nearest(masks, camera, image_name=path.name)


def undistort_masks_nearest(masks: np.ndarray, camera: Cameras, image_name: str = "") -> np.ndarray:
    """Undistort masks given on the raw image exactly as nerfstudio undistorts the image
    (``_undistort_image``: same new camera matrix and crop), but with nearest-neighbour sampling.

    Only perspective (OPENCV) cameras are supported; fisheye raises a :class:`MaskSourceError`.

    Args:
        masks: [K, H, W] bool on the raw (distorted) image.
        camera: that image's camera, before nerfstudio's undistortion.

    Returns:
        [K, h, w] bool aligned with the undistorted, cropped image.
    """
    import cv2

    if camera.camera_type.item() != CameraType.PERSPECTIVE.value:
        raise MaskSourceError(
            f"Image '{image_name}': precomputed (folder) masks can only be undistorted for perspective cameras; "
            "for fisheye cameras use the sam, levels or superpixel source, which run on the undistorted images."
        )
    K = camera.get_intrinsics_matrices().numpy().astype(np.float64)
    d = camera.distortion_params.numpy()
    if d[3] != 0:
        raise MaskSourceError(f"Image '{image_name}': the 4th Brown parameter is not supported (as in nerfstudio)")
    dist = np.array([d[0], d[1], d[4], d[5], d[2], d[3], 0, 0], dtype=np.float64)  # OpenCV order
    K[0, 2] -= 0.5  # nerfstudio: pixel centres -> OpenCV's top-left convention
    K[1, 2] -= 0.5
    H, W = masks.shape[1:]
    new_K, roi = cv2.getOptimalNewCameraMatrix(K, dist, (W, H), 0)
    map_x, map_y = cv2.initUndistortRectifyMap(K, dist, None, new_K, (W, H), cv2.CV_32FC1)  # [H, W] each
    xi = np.floor(map_x + 0.5).astype(np.int64)
    yi = np.floor(map_y + 0.5).astype(np.int64)
    valid = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)  # [H, W]
    out = masks[:, np.clip(yi, 0, H - 1), np.clip(xi, 0, W - 1)] & valid[None]  # [K, H, W]
    x, y, w, h = roi
    return out[:, y : y + h, x : x + w]
