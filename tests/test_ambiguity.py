"""Ambiguity scores: a Gaussian straddling two objects against interior ones."""

from __future__ import annotations

import torch

from trace3d_ns.git.ambiguity import AmbiguityConfig, ambiguity_scores, ambiguous
from trace3d_ns.git.tracing import TraceAccumulator, TraceConfig
from trace3d_ns.rendering import Contributions


def _store(pairs_per_view: list[list[tuple[int, int, float]]], n: int):
    """Views given as (Gaussian, patch, weight) pairs; pixel j of a [1, 4] patch map is patch j."""
    acc = TraceAccumulator(n, len(pairs_per_view), TraceConfig(min_weight=0.0))
    for v, pairs in enumerate(pairs_per_view):
        g, p, w = (torch.tensor(x) for x in zip(*pairs))
        acc.add_view(v, Contributions(g, p, w.float(), 4, 1), torch.arange(4, dtype=torch.int32)[None])
    return acc.build()


def test_straddling_gaussian_is_ambiguous_interior_ones_are_not():
    # Gaussian 0: inside object patch 1 everywhere. Gaussian 1: half on patch 1, half on patch 2 in
    # every view (straddles two objects). Gaussian 2: split in 1 of 4 views only. Gaussian 3: on the
    # border of a mask and the unmasked region (patch 0) in 3 of 4 views. Gaussian 4: unseen.
    views = []
    for v in range(4):
        pairs = [(0, 1, 0.9), (1, 1, 0.4), (1, 2, 0.4)]
        pairs += [(2, 2, 0.3), (2, 3, 0.3)] if v == 0 else [(2, 3, 0.6)]
        pairs += [(3, 0, 0.5), (3, 3, 0.5)] if v > 0 else [(3, 3, 1.0)]
        views.append(pairs)
    store = _store(views, 5)
    score, seen = ambiguity_scores(store)
    assert seen.tolist() == [4, 4, 4, 4, 0]
    assert torch.allclose(score, torch.tensor([0.0, 1.0, 0.25, 0.75, 0.0]))
    assert ambiguous(store).tolist() == [False, True, False, True, False]


def test_gamma_threshold_and_visibility():
    # 70 / 30 split: ambiguous at gamma 0.8, not at gamma 0.6. A faint view (weight below
    # min_weight) does not count as seen.
    views = [[(0, 1, 0.7), (0, 2, 0.3)], [(0, 1, 0.7), (0, 2, 0.3)], [(0, 1, 0.7), (0, 2, 0.3)]]
    views.append([(0, 1, 0.01), (0, 1, 0.001)])
    store = _store(views, 1)
    assert ambiguous(store, AmbiguityConfig(gamma=0.8)).tolist() == [True]
    assert ambiguous(store, AmbiguityConfig(gamma=0.6)).tolist() == [False]
    score, seen = ambiguity_scores(store, AmbiguityConfig(min_weight=0.05))
    assert seen.tolist() == [3] and score.tolist() == [1.0]
    score, seen = ambiguity_scores(store, AmbiguityConfig(min_weight=0.0))
    assert seen.tolist() == [4] and score.tolist() == [0.75]


def test_views_seeing_counts_views_at_or_above_a_weight():
    """Density control's unseen test: a Gaussian traced faintly in many views is seen at a low
    `unseen_weight` and unseen at the ambiguity test's 0.5; one traced nowhere is unseen at any."""
    from trace3d_ns.git.ambiguity import views_seeing
    from trace3d_ns.git.density import plan_cycle

    views = [[(0, 1, 0.9), (1, 1, 0.2)], [(0, 1, 0.8), (1, 2, 0.3)], [(0, 2, 0.1), (1, 2, 0.2)]]  # Gaussian 2: never traced
    store = _store(views, 3)
    assert views_seeing(store, 0.5).tolist() == [2, 0, 0]
    assert views_seeing(store, 0.05).tolist() == [3, 3, 0]
    no = torch.zeros(3, dtype=torch.bool)
    prune, _ = plan_cycle(no, views_seeing(store, 0.05), None, False, prune_unseen=True)
    assert prune.tolist() == [False, False, True]
    prune, _ = plan_cycle(no, views_seeing(store, 0.5), None, False, prune_unseen=True)
    assert prune.tolist() == [False, True, True]
