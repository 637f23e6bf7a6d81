"""Online self-prompting: point prompts in one view -> the object's Gaussians, through all views.

1. A mask is made in the reference view from the user's points (SAM's point prompts, or, without
   weights, the union of the instance patches under the points).
2. Gaussian Instance Tracing gives the mask back to the Gaussians: each Gaussian accumulates the
   blending weight it put inside masks (`inside`) and everywhere (`total`) over the views seen.
3. Views are visited nearest-camera first. In each, the current object estimate
   s_g = inside_g / total_g is rendered as a per-pixel probability; new positive prompts are its
   most confident pixels, spread apart by non-maximum suppression (as in SA3D). A mask is made from
   them, traced, and the estimate updated.
4. The object is every Gaussian with s_g > `assign_threshold` (and enough total weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from trace3d_ns.rendering import Contributions

Points = Sequence[Tuple[float, float]]


class PromptMasker(Protocol):
    """Makes a [H, W] bool mask in training view `view` from positive and negative pixel points (x, y)."""

    def __call__(self, view: int, positive: Points, negative: Points) -> Tensor: ...


@dataclass
class PatchPromptMasker:
    """Weights-free masker: the union of the patches under the positive points, minus those under
    the negative points (patch 0, "no mask", never counts)."""

    patch_maps: Sequence[Tensor]  # per view, int [H, W]

    def __call__(self, view: int, positive: Points, negative: Points) -> Tensor:
        patches = self.patch_maps[view]
        pick = lambda pts: {int(patches[int(y), int(x)]) for x, y in pts} - {0}  # noqa: E731
        ids = sorted(pick(positive) - pick(negative))
        if not ids:
            return torch.zeros_like(patches, dtype=torch.bool)
        return torch.isin(patches, torch.tensor(ids, device=patches.device))


@dataclass
class SamPromptMasker:
    """segment-anything's `SamPredictor` on the training images; the best-scored multimask output."""

    predictor: object  # segment_anything.SamPredictor
    images: Sequence[np.ndarray]  # per view, uint8 [H, W, 3] RGB

    def __call__(self, view: int, positive: Points, negative: Points) -> Tensor:
        self.predictor.set_image(self.images[view])
        coords = np.array(list(positive) + list(negative), dtype=np.float32)
        labels = np.array([1] * len(positive) + [0] * len(negative), dtype=np.int64)
        masks, scores, _ = self.predictor.predict(point_coords=coords, point_labels=labels, multimask_output=True)
        return torch.from_numpy(masks[int(np.argmax(scores))])


@dataclass
class SelfPromptConfig:
    """Self-prompting settings."""

    prompts_per_view: int = 3
    """Positive points drawn in each new view."""
    min_confidence: float = 0.8
    """A pixel can become a prompt only when the rendered object probability there is at least this."""
    suppression_radius: float = 0.08
    """Non-maximum suppression radius between prompts, as a fraction of the image diagonal."""
    min_coverage: float = 0.5
    """A pixel counts towards the rendered object only where Gaussians with an estimate cover at least
    this much of its alpha."""
    assign_threshold: float = 0.5
    """A Gaussian belongs to the object when more than this fraction of its traced weight was inside masks."""
    min_total_weight: float = 0.05
    """Gaussians with less traced weight than this over all visited views stay unassigned."""


@dataclass
class SelfPromptResult:
    selected: Tensor  # [N] bool, the object's Gaussians
    score: Tensor  # [N] inside / total traced weight (0 where never seen)
    total: Tensor  # [N] traced weight over the visited views (how well each Gaussian was seen)
    masks: Dict[int, Tensor] = field(default_factory=dict)  # view -> [H, W] bool mask used
    prompts: Dict[int, List[Tuple[int, int]]] = field(default_factory=dict)  # view -> positive points
    order: List[int] = field(default_factory=list)  # views in visiting order


def object_probability(c: Contributions, score: Tensor, seen: Tensor, min_coverage: float) -> Tensor:
    """Per pixel: the alpha-normalised object score of the Gaussians there with an estimate. [H, W]"""
    known = seen[c.gaussian_ids]
    num = torch.zeros(c.width * c.height, device=c.weights.device)
    den = torch.zeros_like(num)
    alpha = torch.zeros_like(num).index_add_(0, c.pixel_ids, c.weights)
    num.index_add_(0, c.pixel_ids[known], c.weights[known] * score[c.gaussian_ids[known]])
    den.index_add_(0, c.pixel_ids[known], c.weights[known])
    prob = torch.where(den >= min_coverage * alpha.clamp(min=1e-8), num / den.clamp(min=1e-8), torch.zeros_like(num))
    return prob.reshape(c.height, c.width)


def spread_prompts(prob: Tensor, count: int, min_confidence: float, radius_px: float) -> List[Tuple[int, int]]:
    """Up to `count` (x, y) pixels of highest probability >= min_confidence, pairwise farther than
    `radius_px` (greedy non-maximum suppression)."""
    H, W = prob.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=prob.device), torch.arange(W, device=prob.device), indexing="ij")
    p = prob.clone()
    points: List[Tuple[int, int]] = []
    for _ in range(count):
        best = int(torch.argmax(p))
        if p.reshape(-1)[best] < min_confidence:
            break
        y, x = divmod(best, W)
        points.append((x, y))
        p[(xs - x) ** 2 + (ys - y) ** 2 <= radius_px**2] = -1.0
    return points


def visiting_order(camera_centres: Tensor, reference: int, views: Sequence[int]) -> List[int]:
    """Views other than the reference, nearest camera centre first (a chain outward from the reference)."""
    others = [v for v in views if v != reference]
    d = (camera_centres[others] - camera_centres[reference]).norm(dim=-1)
    return [others[i] for i in torch.argsort(d).tolist()]


@torch.no_grad()
def self_prompt(
    view_contributions: Callable[[int], Contributions],
    num_gaussians: int,
    masker: PromptMasker,
    reference: int,
    positive: Points,
    negative: Points = (),
    views: Optional[Sequence[int]] = None,
    camera_centres: Optional[Tensor] = None,
    config: Optional[SelfPromptConfig] = None,
    device: torch.device | str = "cpu",
) -> SelfPromptResult:
    """Runs self-prompting from `positive`/`negative` points (x, y) in view `reference`."""
    config = config or SelfPromptConfig()
    if not positive:
        raise ValueError("self-prompting needs at least one positive point")
    views = list(views) if views is not None else [reference]
    inside = torch.zeros(num_gaussians, device=device)
    total = torch.zeros(num_gaussians, device=device)
    result = SelfPromptResult(selected=torch.zeros(num_gaussians, dtype=torch.bool), score=inside, total=total)

    def trace(c: Contributions, mask: Tensor) -> None:  # GIT: the mask back to the Gaussians
        in_mask = mask.to(device).reshape(-1)[c.pixel_ids]
        inside.index_add_(0, c.gaussian_ids, c.weights * in_mask)
        total.index_add_(0, c.gaussian_ids, c.weights)

    mask = masker(reference, positive, negative)
    if not mask.any():
        raise ValueError(f"the prompt points {list(positive)} give an empty mask in view {reference}")
    result.masks[reference], result.prompts[reference] = mask, [(int(x), int(y)) for x, y in positive]
    trace(view_contributions(reference), mask)
    order = visiting_order(camera_centres, reference, views) if camera_centres is not None else [v for v in views if v != reference]
    for view in order:
        c = view_contributions(view)
        seen = total >= config.min_total_weight
        score = torch.where(seen, inside / total.clamp(min=1e-12), torch.zeros_like(total))
        prob = object_probability(c, score, seen, config.min_coverage)
        radius = config.suppression_radius * float(np.hypot(c.width, c.height))
        prompts = spread_prompts(prob, config.prompts_per_view, config.min_confidence, radius)
        if not prompts:
            continue  # the object is not (confidently) visible here
        mask = masker(view, prompts, ())
        result.masks[view], result.prompts[view] = mask, prompts
        result.order.append(view)
        trace(c, mask)

    seen = total >= config.min_total_weight
    result.score = torch.where(seen, inside / total.clamp(min=1e-12), torch.zeros_like(total))
    result.selected = seen & (result.score > config.assign_threshold)
    return result
