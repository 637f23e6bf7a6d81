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

With ``alike`` (a [L, L] bool matrix over label values), pairs of different labels that it marks
alike are left out of each other's denominators: neither positives nor negatives. For raw SAM
patches, ``patches.patch_mask_alike`` marks two patches that one mask covers together: a whole
object over its parts splits the object into patches, and without it the loss pushes the parts'
features apart in every view where SAM also gave the parts; the whole's mask says they may be one
object, and the views that separate them still do so.

`contrastive_loss` is the fast path: one autograd node on the pixels sorted by label, whose
[M, M] work is one matrix product, a clamp, an exp and a row sum forward and two products
backward (see `_Contrastive`), instead of the dozens of [M, M] passes autograd makes through two
logsumexps and their masks. `contrastive_loss_reference` is the plain autograd version it is tested
against, and what the fast path falls back to on batches it cannot take exactly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _sample(candidates: Tensor, num_samples: int, generator: Optional[torch.Generator]) -> Tensor:
    """Up to `num_samples` distinct entries of `candidates` [P], uniformly."""
    if candidates.numel() <= num_samples:
        return candidates
    pick = torch.randperm(candidates.numel(), generator=generator, device="cpu")[:num_samples]
    return candidates[pick.to(candidates.device)]


def _balanced_quota(counts: List[int], budget: int) -> int:
    """The largest q with sum(min(c, q) for c in counts) <= budget (water filling)."""
    remaining, left = budget, len(counts)
    for c in sorted(counts):
        if c * left > remaining:
            return remaining // left
        remaining -= c
        left -= 1
    return max(counts, default=0)


def _sample_balanced(
    candidates: Tensor, labels: Tensor, num_samples: int, generator: Optional[torch.Generator], cap: Optional[int] = None
) -> Tensor:
    """Up to `num_samples` distinct entries of `candidates` [P] (labels [P]), as evenly over the
    labels as their sizes allow: every label gets min(its size, q) random entries for the largest
    such q within the budget (at most `cap`), and the rest of the budget goes to random remaining
    entries."""
    if candidates.numel() <= num_samples:
        return candidates
    perm = torch.randperm(candidates.numel(), generator=generator, device="cpu").to(candidates.device)  # [P]
    grouped, within = torch.sort(labels[perm].int(), stable=True)  # (an int32 sort: 3x faster than int64)
    order = perm[within]  # [P] by label, random within one
    counts = torch.bincount(labels)  # [max label + 1]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[grouped.long()]  # [P] within its label
    quota = _balanced_quota(counts[counts > 0].tolist(), num_samples)
    take = rank < (quota if cap is None else min(quota, cap))
    chosen, rest = order[take], order[~take]
    extra = num_samples - chosen.numel()
    if extra > 0:
        chosen = torch.cat([chosen, _sample(rest, extra, generator)])
    return candidates[chosen]


def sample_labelled_pixels(
    labels: Tensor,
    num_samples: int,
    generator: Optional[torch.Generator] = None,
    num_unlabelled: int = 0,
    balanced: bool = False,
    min_per_label: int = 0,
) -> Tensor:
    """Flat indices of up to `num_samples` distinct pixels with label > 0, then up to
    `num_unlabelled` distinct pixels with label 0 (the loss's negatives). labels [H, W] -> [M] int64.
    Uniform over the labelled pixels, or with `balanced` as evenly over the labels as their sizes
    allow (`_sample_balanced`), so that a small object gets anchors and positives in every step;
    with `min_per_label` k, every label first gets min(its pixels, k) (less when the labels' quotas
    exceed the budget), the rest uniform."""
    flat = labels.reshape(-1)
    labelled = torch.nonzero(flat > 0).squeeze(1)  # [P]
    if balanced or min_per_label > 0:
        cap = None if balanced else min_per_label
        picked = _sample_balanced(labelled, flat[labelled], num_samples, generator, cap)  # [M1]
    else:
        picked = _sample(labelled, num_samples, generator)  # [M1]
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


def _check_alike(labels: Tensor, alike: Tensor) -> None:
    """ValueError unless ``alike`` is a square [L, L] matrix that every label in [0, L) indexes."""
    L = alike.shape[0]
    if alike.dim() != 2 or alike.shape[1] != L:
        raise ValueError(f"alike must be a square [L, L] matrix, got {tuple(alike.shape)}")
    if labels.numel() and (int(labels.max()) >= L or int(labels.min()) < 0):
        raise ValueError(f"labels must lie in [0, {L}) to index alike [{L}, {L}], got {int(labels.min())}..{int(labels.max())}")


def ignored_pairs(labels: Tensor, alike: Optional[Tensor]) -> Optional[Tensor]:
    """[M, M] bool: the pixel pairs of different labels that ``alike`` [L, L] marks alike (left out
    of the loss), or None without ``alike``."""
    if alike is None:
        return None
    _check_alike(labels, alike)
    alike = alike.to(device=labels.device, dtype=torch.bool)
    return alike[labels[:, None], labels[None, :]] & (labels[:, None] != labels[None, :])  # [M, M]


def contrastive_loss_reference(
    features: Tensor, labels: Tensor, temperature: float, alike: Optional[Tensor] = None
) -> Tensor:
    """features [M, D], labels [M] (0: negative only), alike [L, L] or None -> scalar loss (0 when no
    pixel has a positive); autograd through two logsumexps (the reference of `contrastive_loss`)."""
    pairs = _positives(features, labels)
    if pairs is None:
        return features.sum() * 0.0
    positive, has_positive = pairs
    sq = (features * features).sum(dim=1)  # [M]
    # logits = -tau ||f_u - f_u'||^2 = 2 tau f_u . f_u' - tau |f_u|^2 - tau |f_u'|^2, in one addmm
    logits = torch.addmm(-temperature * (sq[:, None] + sq[None, :]), features, features.T, alpha=2.0 * temperature)
    logits = logits.fill_diagonal_(float("-inf"))  # [M, M] u' != u
    ignored = ignored_pairs(labels, alike)
    if ignored is not None:
        logits = logits.masked_fill(ignored, float("-inf"))  # [M, M] alike pairs are no negatives
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return -(log_pos - log_all)[has_positive].mean()


_FLOOR = -80.0
"""Logits below this count as exp(-80) ~ 2e-35 instead of their own, smaller value: below it float32
goes denormal, and denormal arithmetic made the loss 2-3x slower."""

_MIN_ROW_SUM = math.exp(-30.0)
"""The fast path takes exp of the logits unshifted (they are <= 0: no overflow). It is exact to
float32 precision while every anchor row's sums over u' != u and over its positives stay above
this: a row's largest term is then >= exp(-30) / M, and the floored terms change the sums by less
than M * exp(-80) / exp(-30 - ln M) relative. Batches with a row below it (positives ~5.5 / sqrt(tau)
apart or more) take the reference instead."""


def _label_blocks(labels: Tensor) -> Tuple[Tensor, List[Tuple[int, int]]]:
    """(order [M]: a stable sort of the labels; [(start, end)] of the runs of one label > 0 with
    at least two pixels in the sorted order: the anchors and their positives)."""
    sorted_labels, order = torch.sort(labels, stable=True)
    values, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    ends = torch.cumsum(counts, dim=0)
    blocks = [
        (int(e - c), int(e)) for v, c, e in zip(values.tolist(), counts.tolist(), ends.tolist()) if v > 0 and c >= 2
    ]
    return order, blocks


def _alike_blocks(sorted_labels: Tensor, alike: Tensor) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """[((start, end) of label a, (start, end) of label b)] in the sorted samples, for every ordered
    pair of different labels a, b > 0 present that ``alike`` marks alike."""
    values, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    ends = torch.cumsum(counts, dim=0)
    runs = list(zip((ends - counts).tolist(), ends.tolist()))
    alike = alike.to(device=values.device, dtype=torch.bool)
    pairs = alike[values[:, None], values[None, :]]  # [V, V]
    pairs &= (values > 0)[:, None] & (values > 0)[None, :]
    pairs.fill_diagonal_(False)
    return [(runs[i], runs[j]) for i, j in pairs.nonzero().tolist()]


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside the block (None or the current count: as is)."""
    previous = torch.get_num_threads()
    if threads is None or threads <= 0 or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Contrastive(torch.autograd.Function):
    """The loss with its gradient written out, on features sorted by label so that the positives of
    an anchor are the other rows of its label's block. With A_i = [f_i, |f_i|^2, 1] and
    B_j = [2 tau f_j, -tau, -tau |f_j|^2], the logits are one product A B^T, E = exp(logits) (0 on the
    diagonal and on the pairs `alike` leaves out), s_i = sum_j E_ij, p_i = the same over i's block:

        loss = -mean_anchors (log p_i - log s_i)
        G = dL/dlogits = diag(a) E - diag(b) (E on the blocks),   a = w / s, b = w / p, w = grad / n on anchors
        dL/dA = G B,   dL/dB = G^T A

    Only anchors have rows in G (w is 0 elsewhere), and in the label order every anchor comes after
    the unlabelled samples (label 0 sorts first): E is built for the rows from the first block on,
    [M - first, M] (the unlabelled ~20% of the samples are columns only). Forward that is one
    product, a clamp, an exp and a row sum; backward one product with E and one with its transpose,
    plus one small product per label (a block of E is symmetric, as the logits are). Batches where
    this is not exact (see ``_MIN_ROW_SUM``) take the reference."""

    @staticmethod
    def forward(ctx, features, labels, order, blocks, temperature, alike, threads):
        ctx.threads = threads
        with torch_threads(threads):
            return _Contrastive._forward(ctx, features, labels, order, blocks, temperature, alike)

    @staticmethod
    def _forward(ctx, features, labels, order, blocks, temperature, alike):
        f = features[order]  # [M, D] sorted by label
        sq = (f * f).sum(dim=1, keepdim=True)  # [M, 1]
        ones = torch.ones_like(sq)
        A = torch.cat([f, sq, ones], dim=1)  # [M, D + 2]
        B = torch.cat([f * (2.0 * temperature), ones * -temperature, sq * -temperature], dim=1)  # [M, D + 2]
        first = blocks[0][0]  # rows before it are never anchors
        E = torch.mm(A[first:], B.T).clamp_(min=_FLOOR).exp_()  # [M - first, M]
        E[:, first:].fill_diagonal_(0.0)  # u' != u
        if alike is not None:  # alike labels are no negatives: zero their blocks of E
            for (a0, a1), (b0, b1) in _alike_blocks(labels[order], alike):
                if a1 > first:
                    E[max(a0, first) - first : a1 - first, b0:b1] = 0.0
        s = E.sum(dim=1)  # [M - first]
        p = torch.zeros_like(s)
        for start, end in blocks:
            p[start - first : end - first] = E[start - first : end - first, start:end].sum(dim=1)
        anchors = torch.cat([torch.arange(a, b, device=f.device) for a, b in blocks]) - first  # [n]
        s_a, p_a = s[anchors], p[anchors]
        ctx.fallback = not bool(
            torch.isfinite(s_a).all() and (s_a >= _MIN_ROW_SUM).all() and (p_a >= _MIN_ROW_SUM).all()
        )
        if ctx.fallback:
            with torch.enable_grad():
                detached = features.detach().requires_grad_(True)
                loss = contrastive_loss_reference(detached, labels, temperature, alike)
                (grad,) = torch.autograd.grad(loss, detached)
            ctx.save_for_backward(grad)
            return loss.detach()
        w = torch.zeros_like(s)
        w[anchors] = 1.0 / anchors.numel()
        ctx.save_for_backward(order, f, A, B, E, w / s, w / p.clamp(min=_MIN_ROW_SUM))
        ctx.blocks, ctx.temperature, ctx.first = blocks, temperature, first
        return (torch.log(s_a) - torch.log(p_a)).clamp_(min=0.0).mean()  # p <= s: >= 0 but for rounding

    @staticmethod
    def backward(ctx, grad):
        with torch_threads(ctx.threads):
            return _Contrastive._backward(ctx, grad) + (None,)

    @staticmethod
    def _backward(ctx, grad):
        if ctx.fallback:
            (g,) = ctx.saved_tensors
            return g * grad, None, None, None, None, None
        order, f, A, B, E, a, b = ctx.saved_tensors  # E [R, M], a and b [R]: the rows from `first` on
        first = ctx.first
        a, b = a * grad, b * grad  # [R]
        rows = slice(first, None)
        dA = torch.zeros_like(A)  # [M, D + 2]: no gradient through the rows that are never anchors
        dA[rows] = torch.mm(E, B).mul_(a[:, None])  # diag(a) E B
        dB = torch.mm(E.T, A[rows] * a[:, None])  # [M, D + 2] E^T diag(a) A
        k = B.shape[1]
        rhs = torch.cat([B, A * F.pad(b, (first, 0))[:, None]], dim=1)  # [M, 2 (D + 2)]
        for start, end in ctx.blocks:
            block = torch.mm(E[start - first : end - first, start:end], rhs[start:end])  # symmetric block
            dA[start:end] -= b[start - first : end - first, None] * block[:, :k]
            dB[start:end] -= block[:, k:]
        D, tau = f.shape[1], ctx.temperature
        df = dA[:, :D] + 2.0 * tau * dB[:, :D] + 2.0 * f * (dA[:, D : D + 1] - tau * dB[:, D + 1 : D + 2])  # [M, D]
        out = torch.empty_like(df)
        out[order] = df
        return out, None, None, None, None, None


def contrastive_loss(
    features: Tensor, labels: Tensor, temperature: float, alike: Optional[Tensor] = None, threads: Optional[int] = None
) -> Tensor:
    """features [M, D], labels [M] (0: negative only) -> scalar loss (0 when no pixel has a positive).
    ``alike`` [L, L] (label values < L): pairs of different labels marked alike are no negatives.
    ``threads``: torch intra-op threads for its forward and backward (None: as set), e.g. every core
    for the [M, M] products while the rest of a CPU step runs on one."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
    order, blocks = _label_blocks(labels)
    if not blocks:  # no pixel has a positive
        return features.sum() * 0.0
    if alike is not None:
        _check_alike(labels, alike)
    return _Contrastive.apply(features, labels, order, blocks, float(temperature), alike, threads)
