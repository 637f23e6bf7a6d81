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
Selection compares fbar_g with a clicked pixel's F(u) by cosine similarity (``feature`` mode).

``traced_match_share`` is the other way round, the extraction protocol of the authors' release:
each view's pixels are first labelled by comparing F(u) with the query, and that 2D prediction is
traced back, s_g = sum_u w_gu [cos(F(u), q) >= t] / sum_u w_gu; a Gaussian is selected when s_g >
0.66 (``traced`` mode). A Gaussian that straddles the object and its neighbour renders partly
outside the prediction and is left out, where the mean of its pixels' features may still match.

Views are processed one at a time and each view's pairs in chunks of ``pair_chunk``: besides the
[N, D] and [H*W, D] accumulators, the temporaries are [pair_chunk, D], not [pairs, D] (a megapixel
view has tens of millions of pairs).
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


PAIR_CHUNK = 1 << 18
"""Pairs per chunk: each chunk's temporaries are 2 x [PAIR_CHUNK, D] float32 (32 MB at D = 16)."""


def rendered_views(model, cameras, max_views: int = 64, pair_chunk: int = PAIR_CHUNK):
    """Per view of ``cameras`` (at most ``max_views``, spread evenly): (contributions, F [HW, D], alpha
    [HW]), F the rendered alpha-normalised feature of every pixel. One view in memory at a time, if
    the caller drops its references before asking for the next."""
    features = model.gauss_params["features"].detach()  # [N, D]
    d = features.shape[1]
    for i in spread_views(len(cameras), max_views).tolist():
        c = camera_contributions(model, cameras[i : i + 1])
        pixels = c.width * c.height
        rendered = torch.zeros(pixels, d, device=c.weights.device)  # [HW, D]
        alpha = torch.zeros(pixels, device=c.weights.device)  # [HW]
        for g, p, w in _chunks(c, pair_chunk):  # [k] each
            rendered.index_add_(0, p, w[:, None] * features[g])
            alpha.index_add_(0, p, w)
        rendered /= alpha.clamp(min=1e-6)[:, None]
        yield c, rendered, alpha
        del c, rendered, alpha


@torch.no_grad()
def backproject_features(model, cameras, max_views: int = 64, pair_chunk: int = PAIR_CHUNK) -> Tensor:
    """fbar [N, D] of the model's Gaussians over ``cameras`` (at most ``max_views`` of them, spread evenly)."""
    features = model.gauss_params["features"].detach()  # [N, D]
    n, d = features.shape
    num = torch.zeros(n, d, device=features.device)
    den = torch.zeros(n, device=features.device)
    for c, rendered, _ in rendered_views(model, cameras, max_views, pair_chunk):
        for g, p, w in _chunks(c, pair_chunk):
            num.index_add_(0, g, w[:, None] * rendered[p])
            den.index_add_(0, g, w)
        del c, rendered  # before the next view's are made
    seen = den > 0
    return torch.where(seen[:, None], num / den.clamp(min=1e-12)[:, None], features)


@torch.no_grad()
def traced_match_share(
    model, cameras, query: Tensor, threshold: float, max_views: int = 64, pair_chunk: int = PAIR_CHUNK
) -> Tensor:
    """Per Gaussian, the share of its blending weight over ``cameras`` that falls on pixels whose
    rendered feature has cosine similarity >= ``threshold`` with ``query`` [D] (each view's 2D
    prediction, traced back as GIT traces a mask); -1 where no view renders it. [N]"""
    n = model.gauss_params["features"].shape[0]
    inside = torch.zeros(n, device=query.device)
    total = torch.zeros(n, device=query.device)
    q = torch.nn.functional.normalize(query.reshape(-1), dim=0)
    for c, rendered, _ in rendered_views(model, cameras, max_views, pair_chunk):
        predicted = (rendered @ q) >= threshold * rendered.norm(dim=-1)  # [HW] cosine >= threshold
        for g, p, w in _chunks(c, pair_chunk):
            inside.index_add_(0, g, w * predicted[p])
            total.index_add_(0, g, w)
        del c, rendered, predicted  # before the next view's are made
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.full_like(total, -1.0))


def _chunks(c, size: int):
    """(gaussian_ids, pixel_ids, weights) of consecutive slices of ``size`` pairs (views, no copies)."""
    size = max(int(size), 1)
    for start in range(0, len(c), size):
        yield c.gaussian_ids[start : start + size], c.pixel_ids[start : start + size], c.weights[start : start + size]
