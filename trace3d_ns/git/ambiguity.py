"""Ambiguous Gaussians (Trace3D, GIT-guided density control): Gaussians that straddle instances.

For Gaussian ``i`` seen in the views ``V_i`` (observations with total weight >= ``min_weight``),

    As_i = |{v in V_i : max_j W_ij^v < gamma}| / |V_i|,

the share of its views in which no single patch holds at least ``gamma`` of its weight. It is
ambiguous when ``As_i > threshold``. Patch 0 ("no mask") counts as a patch, so a Gaussian on the
border of a masked and an unmasked region is ambiguous too. Gaussians seen in no view have
``As = 0`` and are not ambiguous (they are the "unseen" ones density control prunes separately).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trace3d_ns.git.tracing import InstanceTraces


@dataclass
class AmbiguityConfig:
    """Thresholds of the ambiguity score."""

    gamma: float = 0.8
    """A view is ambiguous for a Gaussian when its most probable patch has less than this."""
    threshold: float = 0.5
    """theta_As: ambiguous when the share of ambiguous views exceeds this."""
    min_weight: float = 0.05
    """A Gaussian is seen in a view when its total weight there is >= this (alpha * T units)."""


@torch.no_grad()
def ambiguity_scores(traces: InstanceTraces, config: AmbiguityConfig | None = None) -> tuple[Tensor, Tensor]:
    """(As [N] float32, number of views seeing each Gaussian [N] int64), vectorized over observations."""
    config = config or AmbiguityConfig()
    seen = traces.obs_weight.float() >= config.min_weight  # [O]
    unsure = seen & (traces.max_prob() < config.gamma)  # [O]
    owner = traces.obs_gaussian()  # [O]
    num_seen = _per_gaussian_count(traces, owner, seen)
    num_unsure = _per_gaussian_count(traces, owner, unsure)
    return num_unsure.float() / num_seen.clamp(min=1).float(), num_seen


def views_seeing(traces: InstanceTraces, min_weight: float) -> Tensor:
    """Training views whose traced weight of each Gaussian is >= ``min_weight``. [N] int64"""
    return _per_gaussian_count(traces, traces.obs_gaussian(), traces.obs_weight.float() >= min_weight)


def _per_gaussian_count(traces: InstanceTraces, owner: Tensor, flags: Tensor) -> Tensor:
    """Observations with ``flags`` [O] bool set, per Gaussian (``owner`` [O]). [N] int64"""
    counts = torch.zeros(traces.num_gaussians, dtype=torch.long, device=traces.device)
    return counts.index_add_(0, owner, flags.long())


def ambiguous(traces: InstanceTraces, config: AmbiguityConfig | None = None) -> Tensor:
    """Gaussians with As > threshold. [N] bool"""
    config = config or AmbiguityConfig()
    score, _ = ambiguity_scores(traces, config)
    return score > config.threshold
