"""Ground-truth segmentation for trace3d-eval: find it, match it to the pipeline's images, load it.

Three kinds, detected from the folder given with ``--gt`` (or forced with ``--kind``):

- ``instances``: ``<dir>/gt_instances/<image stem>.png``, uint16 instance ids, 0 = background
  (what ``trace3d-scene`` writes). Objects are the nonzero ids. Beside it, ``<dir>/gt_amodal/<id>/
  <image stem>.png`` (8-bit, foreground > 127), where present, is object ``id`` alone: its whole
  silhouette with nothing hidden by other objects (``trace3d-scene`` writes it for the test views).
- ``foreground``: ``<dir>/gt_masks/<NNN>.png``, 8-bit, foreground = value > 127 (DTU: 255).
- ``alpha``: a Blender-format scene (``transforms_train.json``...) with RGBA images; foreground =
  alpha > 127 of each image file itself.

Matching a pipeline image ``<anything>/<stem>.<ext>`` to a mask file (instances and foreground):
first a mask whose stem equals the image's stem; otherwise the number that ends the image stem
against masks with an all-digit stem, compared as integers (``frame_012.jpg`` -> ``12.png`` or
``012.png``). The folder is not searched recursively. For ``alpha`` the image file itself is the
ground truth, so it must lie inside the ``--gt`` folder.

Every map is returned at the camera's resolution: if nerfstudio downscaled the images, the mask is
resized with nearest-neighbour sampling (labels are never interpolated). Cameras with lens
distortion are refused: the masks would have to be undistorted like nerfstudio's cached images.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

GTKind = Literal["instances", "foreground", "alpha"]
KindChoice = Literal["auto", "instances", "foreground", "alpha"]

INSTANCES_DIR = "gt_instances"
AMODAL_DIR = "gt_amodal"
FOREGROUND_DIR = "gt_masks"
BLENDER_TRANSFORMS = ("transforms_train.json", "transforms_test.json", "transforms_val.json")
MASK_SUFFIXES = (".png",)
FOREGROUND_LEVEL = 127
"""8-bit masks and alpha: a pixel is foreground when its value is above this (i.e. >= 0.5)."""

_TRAILING_NUMBER = re.compile(r"(\d+)$")


class GroundTruthError(Exception):
    """The ground truth cannot be found, read or matched; the message is one line for the user."""


@dataclass
class GroundTruth:
    """A ground-truth source: its kind and the folder its files are read from."""

    kind: GTKind
    folder: Path
    _by_stem: Dict[str, Path] = field(default_factory=dict, repr=False)
    _by_number: Dict[int, Path] = field(default_factory=dict, repr=False)
    _amodal: Dict[int, "GroundTruth"] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind == "alpha":
            return
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and path.suffix.lower() in MASK_SUFFIXES:
                self._by_stem[path.stem] = path
                if path.stem.isdigit():
                    self._by_number.setdefault(int(path.stem), path)
        amodal = self.folder.parent / AMODAL_DIR
        if self.kind == "instances" and amodal.is_dir():
            for sub in sorted(amodal.iterdir()):
                if sub.is_dir() and sub.name.isdigit() and int(sub.name) > 0:
                    self._amodal[int(sub.name)] = GroundTruth("foreground", sub)

    @property
    def has_amodal(self) -> bool:
        """True when per-object amodal masks (``gt_amodal/``) were found beside the instance maps."""
        return bool(self._amodal)

    def load_amodal(self, image: Path, width: int, height: int) -> Optional[Dict[int, np.ndarray]]:
        """Each object's amodal mask for `image` at width x height ({object id: [H, W] bool}, the
        objects that have a file for it), or None if no object has one (e.g. a training view)."""
        masks = {}
        for object_id, folder in self._amodal.items():
            labels = folder.load(image, width, height)
            if labels is not None:
                masks[object_id] = labels > 0
        return masks or None

    @property
    def has_objects(self) -> bool:
        """True when the maps carry instance ids (several objects), not only foreground."""
        return self.kind == "instances"

    def path_for(self, image: Path) -> Optional[Path]:
        """The ground-truth file of a pipeline image, or None if there is none."""
        if self.kind == "alpha":
            image = image.resolve()
            return image if image.is_file() and image.is_relative_to(self.folder.resolve()) else None
        if image.stem in self._by_stem:
            return self._by_stem[image.stem]
        number = _TRAILING_NUMBER.search(image.stem)
        return self._by_number.get(int(number.group(1))) if number else None

    def expected_example(self, image: Path) -> str:
        """Where the ground truth of `image` would be, for error messages."""
        if self.kind == "alpha":
            return f"{image} inside {self.folder} with an alpha channel"
        return str(self.folder / f"{image.stem}.png")

    def load(self, image: Path, width: int, height: int) -> Optional[np.ndarray]:
        """The label map of `image` at width x height, or None if it has no ground truth. [H, W] int64

        Instances: the ids (0 = background). Foreground and alpha: 1 = foreground, 0 = background.
        """
        path = self.path_for(image)
        if path is None:
            return None
        try:
            with Image.open(path) as im:
                mode, arr = im.mode, np.asarray(im)
        except OSError as err:
            raise GroundTruthError(f"cannot read ground truth {path}: {err}") from None
        if self.kind == "instances":
            if arr.ndim != 2:
                raise GroundTruthError(f"{path}: instance ids must be a single-channel image, got mode {mode}")
            labels = arr.astype(np.int64)
        elif self.kind == "foreground":
            gray = arr if arr.ndim == 2 else arr[..., 0]
            labels = (gray > FOREGROUND_LEVEL).astype(np.int64)
        else:
            if arr.ndim != 3 or arr.shape[2] != 4:
                raise GroundTruthError(f"{path}: --kind alpha needs RGBA images, got mode {mode}")
            labels = (arr[..., 3] > FOREGROUND_LEVEL).astype(np.int64)
        return resize_nearest(labels, height, width)


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map [h, w] to [height, width] (pixel centres sampled)."""
    h, w = labels.shape
    if (h, w) == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)  # [height]
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)  # [width]
    return labels[rows[:, None], cols[None, :]]


def find_ground_truth(root: Path, kind: KindChoice = "auto") -> GroundTruth:
    """The ground truth under `root` (a scene folder or the mask folder itself) of the given kind.

    ``auto``: ``gt_instances/`` -> instances, ``gt_masks/`` -> foreground (looked for inside `root`,
    or `root` itself carrying that name), else a Blender scene (``transforms_*.json``) -> alpha.
    """
    if not root.is_dir():
        raise GroundTruthError(f"ground-truth folder {root} does not exist")
    folders: Dict[GTKind, str] = {"instances": INSTANCES_DIR, "foreground": FOREGROUND_DIR}
    if kind == "auto":
        for gt_kind, name in folders.items():
            if (root / name).is_dir():
                return GroundTruth(gt_kind, root / name)
            if root.name == name:
                return GroundTruth(gt_kind, root)
        if any((root / name).is_file() for name in BLENDER_TRANSFORMS):
            return GroundTruth("alpha", root)
        raise GroundTruthError(
            f"cannot tell the ground-truth kind of {root}: expected {INSTANCES_DIR}/, {FOREGROUND_DIR}/ or a Blender "
            f"scene ({BLENDER_TRANSFORMS[0]} with RGBA images); pass --kind"
        )
    if kind == "alpha":
        return GroundTruth("alpha", root)
    name = folders[kind]
    return GroundTruth(kind, root / name if (root / name).is_dir() else root)


def load_maps(gt: GroundTruth, images: Sequence[Path], sizes: Sequence[Tuple[int, int]]) -> List[Optional[np.ndarray]]:
    """The label map of each image at its (width, height), None where there is no ground truth."""
    return [gt.load(image, w, h) for image, (w, h) in zip(images, sizes)]


def require_matches(gt: GroundTruth, images: Sequence[Path], maps: Sequence[Optional[np.ndarray]], split: str) -> None:
    """Raise if no image of `split` has ground truth, naming the file that was expected."""
    if images and all(m is None for m in maps):
        raise GroundTruthError(
            f"no ground truth in {gt.folder} matches the {split} images "
            f"(expected e.g. {gt.expected_example(images[0])})"
        )


@dataclass
class View:
    """A posed image with its ground-truth label map."""

    name: str
    camera: Any  # nerfstudio Cameras of shape (1,)
    gt: np.ndarray  # [H, W] int64: instance ids, or 1 = foreground
    image: Optional[Tensor] = None  # [H, W, 3] float in [0, 1] (test views, for the PSNR)
    amodal: Optional[Dict[int, np.ndarray]] = None  # object id -> [H, W] bool: the object alone


def pipeline_views(pipeline: Any, gt: GroundTruth) -> Tuple[List[View], List[View], List[str]]:
    """(training views, test views, test images without ground truth) of a pipeline set up with
    ``test_mode="test"``; only images with ground truth become views."""
    dm = pipeline.datamanager
    if not hasattr(dm, "cached_eval"):
        raise GroundTruthError(f"trace3d-eval needs a full-image datamanager, not {type(dm).__name__}")
    cached = dm.cached_eval  # loads the test images (undistortion would update the test cameras)
    data = Path(dm.config.dataparser.data)
    data_dir = data.parent if data.is_file() else data
    train, _ = _split_views(dm.train_dataset, gt, data_dir, "training", None)
    test, missing = _split_views(dm.eval_dataset, gt, data_dir, "test", [c["image"] for c in cached])
    return train, test, missing


def _split_views(
    dataset: Any, gt: GroundTruth, data_dir: Path, split: str, images: Optional[List[Tensor]]
) -> Tuple[List[View], List[str]]:
    """Views of one split with ground truth, and the names of its images without."""
    cams = dataset.cameras
    if cams.distortion_params is not None and bool(torch.any(cams.distortion_params != 0)):
        raise GroundTruthError(f"the {split} cameras have lens distortion, which trace3d-eval does not support")
    paths = [Path(p) for p in dataset.image_filenames]
    sizes = [(int(cams.width[i]), int(cams.height[i])) for i in range(len(paths))]
    maps = load_maps(gt, paths, sizes)
    require_matches(gt, paths, maps, split)
    views, missing = [], []
    for i, (path, labels) in enumerate(zip(paths, maps)):
        name = os.path.relpath(path, data_dir)
        if labels is None:
            missing.append(name)
            continue
        image = None if images is None else _rgb(images[i])
        amodal = gt.load_amodal(path, *sizes[i]) if gt.has_amodal else None
        views.append(View(name=name, camera=cams[i : i + 1], gt=labels, image=image, amodal=amodal))
    return views, missing


def _rgb(image: Tensor) -> Tensor:
    """A cached nerfstudio image (uint8 or float, 3 or 4 channels) as float RGB in [0, 1]; RGBA is
    composited over black. [H, W, 3]"""
    rgb = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    return rgb[..., :3] * rgb[..., 3:4] if rgb.shape[-1] == 4 else rgb[..., :3]
