"""Contrastive loss on rendered instance features (the paper's offline lifting, as in EgoLifter).

For sampled pixels u with instance labels, with logits l(u, u') = -tau * ||F[u] - F[u']||^2:
    L = -mean_u log( sum_{u' in U+(u)} exp l(u, u') / sum_{u' != u} exp l(u, u') )
where U+(u) are the other sampled pixels with u's label. Pixels with label 0 (no mask covers
them) are never anyone's positive and never anchors; when sampled (``num_unlabelled``) they are
negatives only: they appear in every labelled anchor's denominator, so the features rendered there
are pushed away from every object's. Without them, a Gaussian seen only where no mask is (e.g. a
large background splat) gets its feature trained solely by the object pixels it blends into at
their borders, and is pulled to that object: feature selection then extracts it with the object.
Pixels whose label appears once in the sample have no positive and are skipped as anchors.

`contrastive_loss` is the fast path: one autograd node whose forward takes two shifted exps over
the [M, M] logits (all pairs, positives) and whose backward is written out (two [M, M] x [M, D]
products), instead of the passes autograd makes through two logsumexps and their backward. `contrastive_loss_reference` is the
plain autograd version it is tested against.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _sample(candidates: Tensor, num_samples: int, generator: Optional[torch.Generator]) -> Tensor:
    """Up to `num_samples` distinct entries of `candidates` [P], uniformly."""
    if candidates.numel() <= num_samples:
        return candidates
    pick = torch.randperm(candidates.numel(), generator=generator, device="cpu")[:num_samples]
    return candidates[pick.to(candidates.device)]


def sample_labelled_pixels(
    labels: Tensor, num_samples: int, generator: Optional[torch.Generator] = None, num_unlabelled: int = 0
) -> Tensor:
    """Flat indices of up to `num_samples` distinct pixels with label > 0, then up to
    `num_unlabelled` distinct pixels with label 0 (the loss's negatives). labels [H, W] -> [M] int64."""
    flat = labels.reshape(-1)
    picked = _sample(torch.nonzero(flat > 0).squeeze(1), num_samples, generator)  # [M1]
    if num_unlabelled <= 0:
        return picked
    unlabelled = _sample(torch.nonzero(flat == 0).squeeze(1), num_unlabelled, generator)  # [M0]
    return torch.cat([picked, unlabelled])


def _positives(features: Tensor, labels: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """(positive [M, M] bool: same label, not self; has_positive [M] bool), or None when no pixel
    has a positive (the loss is then 0)."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
    if features.shape[0] < 2:
        return None
    positive = labels[:, None] == labels[None, :]  # [M, M]
    positive &= (labels > 0)[:, None]  # label 0: no positives
    positive.fill_diagonal_(False)
    has_positive = positive.any(dim=1)  # [M]
    return (positive, has_positive) if has_positive.any() else None


def contrastive_loss_reference(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """features [M, D], labels [M] (0: negative only) -> scalar loss (0 when no pixel has a positive); autograd
    through two logsumexps (the reference of `contrastive_loss`)."""
    pairs = _positives(features, labels)
    if pairs is None:
        return features.sum() * 0.0
    positive, has_positive = pairs
    sq = (features * features).sum(dim=1)  # [M]
    # logits = -tau ||f_u - f_u'||^2 = 2 tau f_u . f_u' - tau |f_u|^2 - tau |f_u'|^2, in one addmm
    logits = torch.addmm(-temperature * (sq[:, None] + sq[None, :]), features, features.T, alpha=2.0 * temperature)
    logits = logits.fill_diagonal_(float("-inf"))  # [M, M] u' != u
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return -(log_pos - log_all)[has_positive].mean()


_FLOOR = -80.0
"""Logits more than this below their row's maximum count as exp(-80) ~ 2e-35 instead of their own,
smaller value: below it float32 goes denormal, and denormal arithmetic made the loss 2-3x slower.
The loss changes by less than M * 2e-35 relative (nothing at float32 precision)."""


def _shifted_exp(masked: Tensor, excluded: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """In place on ``masked`` [M, M] (logits with -inf where they do not count): (exp(logits - row
    max) floored at exp(_FLOOR), 0 where excluded; row max [M]). ``excluded`` [M, M] bool marks the
    entries that do not count (None: only the diagonal); rows with none that count get max 0 and
    all zeros."""
    top = masked.amax(dim=1)  # [M]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    soft = masked.sub_(top[:, None]).clamp_(min=_FLOOR).exp_()  # [M, M]
    if excluded is None:
        soft.fill_diagonal_(0.0)
    else:
        soft.masked_fill_(excluded, 0.0)
    return soft, top


class _Contrastive(torch.autograd.Function):
    """The loss with its gradient written out. With softmax_all / softmax_pos the row softmaxes of
    the logits over u' != u / over the positives, and n the rows with a positive:

        loss = -mean_rows (lse_pos - lse_all),   G = dL/dlogits = (softmax_all - softmax_pos) / n
        logits_ij = tau (2 f_i . f_j - |f_i|^2 - |f_j|^2)
        dL/df = 2 tau (G f + G^T f - f * (rowsum G + colsum G))
    """

    @staticmethod
    def forward(ctx, features, positive, has_positive, temperature):
        sq = (features * features).sum(dim=1).mul_(temperature)[:, None]  # [M, 1] tau |f|^2
        logits = torch.mm(features, features.T).mul_(2.0 * temperature).sub_(sq).sub_(sq.T)  # [M, M], in place
        soft_all, top_all = _shifted_exp(logits.clone().fill_diagonal_(float("-inf")), None)  # [M, M] u' != u; [M]
        not_positive = ~positive
        soft_pos, top_pos = _shifted_exp(logits.masked_fill_(not_positive, float("-inf")), not_positive)  # logits used up
        sum_all, sum_pos = soft_all.sum(dim=1), soft_pos.sum(dim=1)  # [M] >= 1 where the row has entries
        rows = has_positive.nonzero().squeeze(1)  # [n]
        lse_pos = top_pos[rows] + torch.log(sum_pos[rows])
        lse_all = top_all[rows] + torch.log(sum_all[rows])
        soft_all.div_(sum_all.clamp(min=1.0)[:, None])  # [M, M] softmax over u' != u
        soft_pos.div_(sum_pos.clamp(min=1.0)[:, None])  # [M, M] softmax over the positives (0 rows without)
        ctx.save_for_backward(features, has_positive, soft_all, soft_pos)
        ctx.temperature = temperature
        return -(lse_pos - lse_all).mean()

    @staticmethod
    def backward(ctx, grad):
        features, has_positive, soft_all, soft_pos = ctx.saved_tensors
        scale = has_positive.to(features.dtype) * (grad / has_positive.sum())  # [M]
        g = (soft_all - soft_pos).mul_(scale[:, None])  # [M, M] G
        v = torch.mm(g, features).add_(torch.mm(g.T, features))  # [M, D] (G + G^T) f without forming G^T
        v.sub_(features * (g.sum(dim=1) + g.sum(dim=0))[:, None])
        return v.mul_(2.0 * ctx.temperature), None, None, None


def contrastive_loss(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """features [M, D], labels [M] (0: negative only) -> scalar loss (0 when no pixel has a positive)."""
    pairs = _positives(features, labels)
    if pairs is None:
        return features.sum() * 0.0
    return _Contrastive.apply(features, *pairs, float(temperature))
