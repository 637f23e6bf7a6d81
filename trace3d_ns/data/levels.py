"""The ``levels`` mask source: weights-free masks whose granularity changes from view to view.

Why: a pixel's patch is the intersection of the masks covering it
(:mod:`trace3d_ns.data.patches`), so a view whose masks include a fine level gives fine patches,
whatever coarser levels add. The ``superpixel`` source runs the same Felzenszwalb scales on every
view: each object is split into the same parts everywhere, and no view offers the evidence GIT
merges on (two parts of one view traced into one patch of most other views). SAM's granularity
varies from view to view, and an object that is whole in most views becomes one instance.

What: each view gets the segments of **one** Felzenszwalb level (a partition of the image, so its
patches are the segments themselves), drawn per view from ``scales`` with ``weights``. Coarse
levels give whole objects in the views where their outline contrasts with the background; the
levels drawn in other views split them differently, as SAM's masks do.

The draw is stratified and seeded: when the source is told the scene's images first
(:meth:`LevelsMaskSource.prepare`, as the datamanager does), the images are ordered by a hash of
``seed`` and their file name (with its folder) and dealt out so that each level gets its weight's
share of the views exactly (largest remainders; independent draws can give a few views all one
level). An image the source was not told about gets an independent draw from the same hash. Either
way the level depends on the seed and the set of image names, not on their order (``seed``,
``scales`` and ``weights`` are part of the mask cache key, the image names are too). Which views get
which level still matters: on DTU scan 37 with four levels 2000-5600 the mean best-mask IoU was
0.80 with seed 0 and 0.83 with seed 1, with the default two levels 0.85 with both.

The default levels come from ``trace3d-bench objectness`` on DTU scan 37 and LEGO (measured before the
stability filter below): 2800 and 4000
hold the object whole (best-mask IoU >= 0.9) in about half the DTU views, with the best mean IoU
and part-joining vote (cohesion 0.87) of the level sets tried; adding 2000 splits objects in more
views (cohesion 0.79), adding 5600 joins them to the background in more (precision 0.88 against
0.92).

Scales are given for an image of ``reference_pixels`` pixels (400x300). Felzenszwalb's merge
threshold is ``scale / |segment|``, so the same scene at another size needs another scale: the
scales are multiplied by ``sqrt(pixels / reference_pixels)`` and ``min_size`` by
``pixels / reference_pixels``. (Measured on DTU scan 37 resized to 200x150: the best whole-object
scale is about 2000, against 2800-4000 at 400x300, i.e. 0.5-0.7x; scaling by area would give 0.25x.
LEGO at 200x200, a high-contrast object on black, does better at larger scales: with the levels
2000-5600, mean best-mask IoU 0.81 unscaled, 0.75 scaled.)

Felzenszwalb's coarse levels also run across weak edges: on DTU scan 37 the segment holding the
objects takes much of the white table in about a third of the views, and the table Gaussians there
then vote for the objects' instance. A segment that the same image at a somewhat finer scale does
not hold (``stability_ratio``) is replaced by the finer segments inside it, as SAM drops masks whose
extent changes with its threshold.

How well the masks cover whole objects, per view, against ground truth: ``trace3d-bench objectness``
(:mod:`trace3d_ns.benchmarks.objectness`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Type

import numpy as np

from trace3d_ns.data.mask_sources import MaskSource, MaskSourceConfig, as_rgb_uint8

REFERENCE_PIXELS = 400 * 300
"""Pixel count the ``levels`` scales are given for."""


@dataclass
class LevelsMaskSourceConfig(MaskSourceConfig):
    """Weights-free masks: per view, the Felzenszwalb segments of one level drawn from ``scales``."""

    _target: Type = field(default_factory=lambda: LevelsMaskSource)
    scales: Tuple[float, ...] = (2800.0, 4000.0)
    """Felzenszwalb ``scale`` of each level at ``reference_pixels`` pixels (larger = bigger segments)."""
    weights: Tuple[float, ...] = ()
    """Probability of each level (normalised; empty = uniform)."""
    seed: int = 0
    """Seed of the per-view draw (with the image's file name)."""
    sigma: float = 0.8
    """Gaussian pre-smoothing of the image."""
    min_size: int = 50
    """Minimum segment size in pixels at ``reference_pixels`` (enforced by post-processing)."""
    reference_pixels: int = REFERENCE_PIXELS
    """Image size (pixels) the scales and ``min_size`` are given for; 0 = use them as they are."""
    stability_ratio: float = 0.7
    """Scale-stability filter (0 = off): each segment of the view's level is compared with the
    segments of the same image at ``stability_ratio`` times its scale; a segment that none of them
    matches with IoU >= ``stability_min_iou`` is replaced by the finer segments inside it. Like the
    stability score with which SAM's automatic generator drops masks that change with the threshold:
    a segment that exists only at one scale has often run across a weak edge (e.g. an object and
    the white table it stands on), while a whole object mostly stays whole at the finer scale.
    Measured on DTU scan 37 (the foreground benchmark's run, 3 prompt points, mIoU / mAcc): off,
    feature 0.945 / 0.975 and instance 0.924 / 0.955; 0.7, feature 0.947 / 0.980 and instance 0.977 /
    0.990 (table pixels inside the pile's segments, all views: 241k -> 105k; views holding the pile
    whole: mean best-segment recall 0.93 -> 0.87). LEGO: 0.990 / 0.997 either way."""
    stability_min_iou: float = 0.8
    """IoU a segment needs with a segment of the finer scale to be kept (see ``stability_ratio``)."""


def view_key(image_path: Path) -> str:
    """What the per-view draw hashes besides the seed: ``<folder name>/<file name>``."""
    path = Path(image_path)
    return f"{path.parent.name}/{path.name}"


def view_hash(seed: int, key: str) -> float:
    """The hash of (seed, key) as a number in [0, 1)."""
    digest = hashlib.blake2b(f"{int(seed)}|{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def draw_level(seed: int, key: str, weights: Sequence[float]) -> int:
    """Index of the level of one view drawn on its own: ``view_hash`` placed in the cumulative
    normalised ``weights``."""
    w = np.asarray(weights, dtype=np.float64)
    cumulative = np.cumsum(w / w.sum())
    return int(min(np.searchsorted(cumulative, view_hash(seed, key), side="right"), len(w) - 1))


def level_counts(n: int, weights: Sequence[float]) -> List[int]:
    """How many of ``n`` views each level gets: ``n * weight`` rounded by largest remainders
    (ties: the lower level), so the counts sum to ``n``."""
    w = np.asarray(weights, dtype=np.float64)
    share = n * w / w.sum()
    counts = np.floor(share).astype(np.int64)
    remainder = share - counts
    order = sorted(range(len(w)), key=lambda i: (-remainder[i], i))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def stratified_levels(seed: int, keys: Sequence[str], weights: Sequence[float]) -> Dict[str, int]:
    """Level of each view key: the distinct keys ordered by ``view_hash`` and dealt out in
    ``level_counts`` runs, level 0 first."""
    unique = sorted(set(keys), key=lambda k: (view_hash(seed, k), k))
    levels = np.repeat(np.arange(len(weights)), level_counts(len(unique), weights))
    return {k: int(level) for k, level in zip(unique, levels)}


def stable_segments(labels: np.ndarray, finer: np.ndarray, min_iou: float) -> np.ndarray:
    """``labels`` [H, W] (0..n-1) with every segment whose best IoU against the segments of
    ``finer`` [H, W] is below ``min_iou`` replaced by the ``finer`` segments inside it; relabelled
    0..m-1."""
    n, nf = int(labels.max()) + 1, int(finer.max()) + 1
    pair = labels.astype(np.int64) * nf + finer  # [H, W] (segment, finer segment)
    keys, overlap = np.unique(pair, return_counts=True)
    a, b = keys // nf, keys % nf
    size_a, size_b = np.bincount(labels.ravel(), minlength=n), np.bincount(finer.ravel(), minlength=nf)
    best = np.zeros(n)
    np.maximum.at(best, a, overlap / (size_a[a] + size_b[b] - overlap))
    unstable = best < min_iou  # [n]
    split = np.where(unstable[labels], n + pair, labels)  # a replaced segment keeps its pieces apart
    return np.unique(split, return_inverse=True)[1].reshape(labels.shape)


class LevelsMaskSource(MaskSource):
    """One Felzenszwalb level per view (see the module docstring)."""

    config: LevelsMaskSourceConfig

    def __init__(self, config: LevelsMaskSourceConfig, **kwargs: Any) -> None:
        super().__init__(config)
        if len(config.scales) < 1:
            raise ValueError("LevelsMaskSourceConfig.scales needs at least one scale")
        if any(s <= 0 for s in config.scales):
            raise ValueError(f"LevelsMaskSourceConfig.scales must be positive, got {config.scales}")
        weights = config.weights or (1.0,) * len(config.scales)
        if len(weights) != len(config.scales):
            raise ValueError(
                f"LevelsMaskSourceConfig.weights has {len(weights)} values for {len(config.scales)} scales"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"LevelsMaskSourceConfig.weights must be >= 0 with a positive sum, got {weights}")
        if not 0.0 <= config.stability_ratio < 1.0:
            raise ValueError(
                f"LevelsMaskSourceConfig.stability_ratio must be in [0, 1) (a finer scale; 0 = off), got {config.stability_ratio}"
            )
        if not 0.0 < config.stability_min_iou <= 1.0:
            raise ValueError(f"LevelsMaskSourceConfig.stability_min_iou must be in (0, 1], got {config.stability_min_iou}")
        self.weights: Tuple[float, ...] = tuple(float(w) for w in weights)
        self._planned: Dict[str, int] = {}

    def prepare(self, image_paths: Sequence[Path]) -> None:
        """Deal the levels out over these images (stratified, see the module docstring)."""
        self._planned = stratified_levels(self.config.seed, [view_key(p) for p in image_paths], self.weights)

    def level(self, image_path: Path) -> int:
        """Index into ``config.scales`` of the level this image gets."""
        key = view_key(image_path)
        if key in self._planned:
            return self._planned[key]
        return draw_level(self.config.seed, key, self.weights)

    def felzenszwalb_settings(self, level: int, height: int, width: int) -> Tuple[float, int]:
        """(scale, min_size) of ``level`` for an image of height x width."""
        c = self.config
        ratio = 1.0 if c.reference_pixels <= 0 else height * width / c.reference_pixels
        return float(c.scales[level]) * math.sqrt(ratio), max(1, int(round(c.min_size * ratio)))

    def segments(self, image: np.ndarray, level: int) -> np.ndarray:
        """The image's Felzenszwalb labels at ``level``. [H, W] int, 0..n-1"""
        from skimage.segmentation import felzenszwalb  # lazy

        rgb = as_rgb_uint8(image)  # [H, W, 3]
        scale, min_size = self.felzenszwalb_settings(level, rgb.shape[0], rgb.shape[1])
        labels = felzenszwalb(rgb, scale=scale, sigma=self.config.sigma, min_size=min_size)
        if self.config.stability_ratio <= 0.0:
            return labels
        finer = felzenszwalb(rgb, scale=scale * self.config.stability_ratio, sigma=self.config.sigma, min_size=min_size)
        return stable_segments(labels, finer, self.config.stability_min_iou)

    def __call__(self, image: np.ndarray, image_path: Path) -> np.ndarray:
        labels = self.segments(image, self.level(image_path))  # [H, W]
        n = int(labels.max()) + 1
        return labels[None, :, :] == np.arange(n)[:, None, None]  # [n, H, W], a partition
