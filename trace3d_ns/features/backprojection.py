"""Per-Gaussian features for selection: the rendered feature maps traced back onto the Gaussians.

The contrastive loss shapes *rendered* features, alpha-weighted blends of the Gaussians' own
features; a single Gaussian's feature is constrained only through those blends, so the Gaussians of
one object scatter widely around the object's rendered feature (measured on a trained 64 px scene:
their squared distances to the clicked pixel's feature had median 3-7, the nearest 1% of the other
objects' Gaussians 6-7). Tracing the rendered maps back with the blending weights, as Gaussian
Instance Tracing does with patch labels, gives each Gaussian the feature it actually shows:

    F(u)     = sum_g w_gu f_g / sum_g w_gu          (the rendered, alpha-normalised feature)
    fbar_g   = sum_u w_gu F(u) / sum_u w_gu         (over the pixels u of the views it renders)

with w_gu = alpha * T from ``contributions``. Gaussians no view renders keep their own feature.
Selection compares fbar_g with a clicked pixel's F(u) by cosine similarity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trace3d_ns.selection import camera_contributions


def spread_views(num_views: int, max_views: int) -> Tensor:
    """Up to ``max_views`` view indices spread evenly over ``num_views`` (all if max_views <= 0). [V]"""
    if max_views <= 0 or num_views <= max_views:
        return torch.arange(num_views)
    return torch.linspace(0, num_views - 1, max_views).round().long().unique()


@torch.no_grad()
def backproject_features(model, cameras, max_views: int = 64) -> Tensor:
    """fbar [N, D] of the model's Gaussians over ``cameras`` (at most ``max_views`` of them, spread evenly)."""
    features = model.gauss_params["features"].detach()  # [N, D]
    n, d = features.shape
    num = torch.zeros(n, d, device=features.device)
    den = torch.zeros(n, device=features.device)
    for i in spread_views(len(cameras), max_views).tolist():
        c = camera_contributions(model, cameras[i : i + 1])
        g, p, w = c.gaussian_ids, c.pixel_ids, c.weights  # [P]
        pixels = c.width * c.height
        rendered = torch.zeros(pixels, d, device=w.device).index_add_(0, p, w[:, None] * features[g])  # [HW, D]
        alpha = torch.zeros(pixels, device=w.device).index_add_(0, p, w)  # [HW]
        rendered = rendered / alpha.clamp(min=1e-6)[:, None]
        num.index_add_(0, g, w[:, None] * rendered[p])
        den.index_add_(0, g, w)
    seen = den > 0
    return torch.where(seen[:, None], num / den.clamp(min=1e-12)[:, None], features)
