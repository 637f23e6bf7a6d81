"""Contrastive loss on rendered instance features (the paper's offline lifting, as in EgoLifter).

For sampled pixels u with instance labels, with logits l(u, u') = -tau * ||F[u] - F[u']||^2:
    L = -mean_u log( sum_{u' in U+(u)} exp l(u, u') / sum_{u' != u} exp l(u, u') )
where U+(u) are the other sampled pixels with u's label. Pixels with label 0 (no instance) are
not sampled; pixels whose label appears once in the sample have no positive and are skipped.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def sample_labelled_pixels(labels: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Flat indices of up to `num_samples` distinct pixels with label > 0. labels [H, W] -> [M] int64."""
    candidates = torch.nonzero(labels.reshape(-1) > 0).squeeze(1)  # [P]
    if candidates.numel() <= num_samples:
        return candidates
    pick = torch.randperm(candidates.numel(), generator=generator, device="cpu")[:num_samples]
    return candidates[pick.to(candidates.device)]


def contrastive_loss(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """features [M, D], labels [M] (> 0) -> scalar loss (0 when no pixel has a positive)."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
    m = features.shape[0]
    if m < 2:
        return features.sum() * 0.0
    positive = labels[:, None] == labels[None, :]  # [M, M]
    positive.fill_diagonal_(False)
    has_positive = positive.any(dim=1)
    if not has_positive.any():
        return features.sum() * 0.0
    sq = (features * features).sum(dim=1)  # [M]
    # logits = -tau ||f_u - f_u'||^2 = 2 tau f_u . f_u' - tau |f_u|^2 - tau |f_u'|^2, in one addmm
    logits = torch.addmm(-temperature * (sq[:, None] + sq[None, :]), features, features.T, alpha=2.0 * temperature)
    logits = logits.fill_diagonal_(float("-inf"))  # [M, M] u' != u
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return -(log_pos - log_all)[has_positive].mean()
