"""Consistent instance maps from Gaussian instance traces (Trace3D, section "consistent instance map").

Definitions (all thresholds are :class:`MergeConfig` fields):

- Gaussian ``g`` is **seen** in view ``v`` when its total weight there is >= ``min_weight``, and
  **informative** when it is seen and its most probable patch is not ``0`` (a Gaussian in the
  region no mask covers says nothing about instances).
- ``g`` is **traced to** patch ``a`` of view ``v`` when it is informative in ``v``, ``a`` is its
  most probable patch and that probability is >= ``traced_min_prob``.
- **Counts** are weighted: a Gaussian counts in a view by ``min(w, count_weight_cap) /
  count_weight_cap`` for its weight ``w`` there, so one drawn faintly (a surface seen through a
  thin object's partial opacity, a tail under a mask's edge) says little about the patch it is
  traced to (``count_weight_cap = 0``: every Gaussian counts 1).
- For a patch ``a`` and another view ``v'``: ``n_a^v'`` / ``m_a^v'`` count ``a``'s traced
  Gaussians seen / informative in ``v'`` (each counted in ``v`` times counted in ``v'``), and
  ``S_a^v'`` sums the distributions (over the patches of ``v'`` other than 0) of the informative
  ones, each weighted the same way. View ``v'`` is **usable** for ``a`` when
  ``m_a^v' >= min_informative * n_a^v'``: most of ``a`` is covered by masks there, so the few
  Gaussians that spill into a neighbour's mask cannot speak for the whole patch.
- **Within-view similarity** of patches ``a, b`` of view ``v``, over the other views usable for
  both (at least ``min_views`` of them): with ``similarity="pairs"`` the paper's mean of
  ``<W_ga^v', W_gb^v'>`` over all (``g_a`` traced to ``a``, ``g_b`` traced to ``b``, ``v'``)
  with both informative, which is exactly ``sum_v' <S_a^v', S_b^v'> / sum_v' m_a^v' m_b^v'``;
  with ``similarity="views"`` (default) the mean over those views of
  ``<S_a^v', S_b^v'> / (m_a^v' m_b^v')``, so that every view has one vote (with "pairs", views
  that see many Gaussians of both patches dominate). Both are exact, no sampling: with the sparse
  product ``C = M D`` (``M``: traced-to indicator [patches, N]; ``D``: distributions [N, patches])
  each view's similarities are one small product of ``C``'s rows. Patches ``a, b`` merge when
  ``sim > merge_threshold`` and both have >= ``min_traced`` traced Gaussians.
- **Segments** are the within-view merged groups, found by greedy average linkage: the most
  similar pair merges first and a merged group's ``C`` row and counts are the sums of its members',
  so a sliver similar to two neighbours can join one but cannot bridge them. For segments ``s``
  (view ``v``) and ``s'`` (view ``v' != v``), ``f(s -> s') = C[s, s'] / n_s^v'``: the share of
  ``s``'s traced Gaussians seen in ``v'`` that fall in ``s'``. ``s`` and ``s'`` are **link
  candidates** when ``f(s -> s') > link_threshold`` and ``f(s' -> s) > link_threshold`` (mutual
  majority: with a threshold >= 0.5 a segment has at most one candidate per view) and
  ``n_s^v', n_s'^v >= min_traced`` and ``>= min_seen_fraction`` of each segment.
- **Global ids**: candidates are accepted by a union-find with path compression, the strongest
  first (largest ``min(f(s -> s'), f(s' -> s))``, ties: the most shared Gaussians), unless the link
  would put two segments of one view into one instance (within-view merging decided they differ;
  without this rule one segment that SAM merged from two objects would chain both objects'
  instances together). The order matters for that rule: a segment SAM merged from two objects
  maps only its larger part's share (``f`` about 0.5-0.8) onto either object's segment of another
  view, while segments of one object map onto each other almost wholly, so the objects' own
  instances form first and each then holds segments of many views; the merged segment can join
  one of them but no longer chain the two (ordered by shared Gaussians, the large merged segments
  came first and linked to one object in one view and to the other in another). Identity is transitive; components are
  numbered 1..G in order of first (view, patch). Patch ``0`` of every view is global id ``0`` ("no
  instance") and never merges or links.
- **Unlinking impure segments** (``unlink_rounds``): a merged segment can still join one object's
  instance through a view where the other object is hidden (its Gaussians seen there are mostly the
  first object's); it then votes that instance's id onto the other object's Gaussians in every view
  where SAM merged the two. After the per-Gaussian vote, a segment whose traced Gaussians mostly
  carry labels other than its instance's id (segment purity ``< unlink_min_purity``) has its
  cross-view links cut (all of them: its identity across views is the one thing in doubt); linking
  and voting are repeated without it, for up to ``unlink_rounds`` rounds (segment purity under the
  round's final labels, after the purity-weighted vote below).
- **Per-Gaussian label**: the global id with the most votes, a vote being the weight (alpha * T)
  the Gaussian draws in each patch in each view where it is seen, i.e. its probability of the patch
  times its total weight in the view (``vote="probability"``: the probability alone). Patch 0 ("no
  mask here") votes for id 0, which wins when it holds at least ``unmasked_min_share`` of the
  Gaussian's votes (default a half: a Gaussian drawn mostly where no mask is stays background even
  when a neighbour's mask spills onto it in a view); otherwise the instance id with the most votes
  wins, so a Gaussian some views leave unmasked keeps the id the others give it. Its confidence is
  the winner's share of all votes, those for 0 included (0 for Gaussians seen nowhere).
  **Contrary votes** (``contrary_weight``): an instance id ranks by its votes minus
  ``contrary_weight`` times the Gaussian's votes for *other* instances in the views where that id
  is present. Such a view holds the id in a segment of its own and draws the Gaussian in another
  one: its within-view merging compared the two and kept them apart. Without it, a small object
  that SAM merges with a large neighbour in a few views loses the vote to the neighbour's id
  whenever its own segments do not link into one instance across views (parts seen from different
  sides, partial masks), since each of its ids then gets the votes of a few views only. With
  ``purity_weighted_vote`` the Gaussians then vote again, every patch's votes weighted by its purity
  under the first vote's labels (patch 0's weight stays 1).
- **Each view's partition** (``view_partition="segments"``): the maps train the features with a
  contrastive loss over the pixels of one view, so what a view's map must get right is which of its
  pixels belong together. Every within-view segment stays one region there, under its heaviest
  patch's id, or under an id of its own when a heavier segment of the view holds that one: two
  segments the view's own merging kept apart are never painted as one object because their
  Gaussians carry the same label (e.g. a box SAM joins with a neighbour in a few views, whose
  instance then wins the box's vote).

The sparse products run on the CPU with scipy; the results come back on the store's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Literal, Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from trace3d_ns.git.tracing import InstanceTraces
from trace3d_ns.rendering import Contributions


@dataclass
class MergeConfig:
    """Thresholds of patch merging and cross-view linking (see the module docstring)."""

    similarity: Literal["views", "pairs"] = "views"
    """pairs: the paper's mean of <W_ga, W_gb> over all (Gaussian pair, other view) combinations, in
    which views seeing many Gaussians of both patches dominate; views: the mean over the other views
    of that view's mean inner product, so every view gets one vote (see the module docstring)."""
    min_weight: float = 0.05
    """A Gaussian is seen in a view when its total weight there is >= this (alpha * T units; use
    pixels for a store traced in count mode)."""
    count_weight_cap: float = 1.0
    """In merging and linking a Gaussian counts in a view by min(its weight there, this) / this, not
    1 (alpha * T units; 0: every seen Gaussian counts 1). A thin object's patch is traced to by the
    faint Gaussians of the surface behind it (seen through its edges' partial opacity, weight ~0.1)
    as many times as by its own (~3): counted 1 each they made half of a leaning rod's patch the
    box's, so its patches linked across views to nothing (and a patch's voted id, see ``patch_ids``,
    counts its Gaussians the same way). Measured with ``contrary_weight`` 1 and no unlinking rounds
    (see those fields) on the cluttered ablation scenes (perfect geometry,
    ``python -m trace3d_ns.git.consistency --stride 2``, seeds 0/1/2), refined maps' mean best-match
    IoU: 0.720/0.665/0.687 counting 1, 0.789/0.716/0.680 weighted (alone, with the earlier
    contrary weight 0.5 and 2 rounds: 0.699/0.524/0.617 -> 0.766/0.604/0.679)."""
    traced_min_prob: float = 0.5
    """A Gaussian is traced to its most probable patch when that probability is >= this."""
    merge_threshold: float = 0.5
    """theta: patches of one view merge when their multi-view similarity exceeds this."""
    alike_by_masks: bool = False
    """Within-view similarity counts two patches of another view as alike (not only one patch with
    itself) when one mask covers both (``patches.patch_mask_alike``: SAM's whole object over parts the
    patch ids keep apart, or one mask over two touching objects). Needs each view's matrix
    (``consistent_instances(alike=...)``); views without one compare patch ids. Measured offline on
    the cluttered scenes' perfect geometry (``python -m trace3d_ns.git.consistency --stride 2``, seeds
    0-4, 3 and 4 held out), training maps' mean best-match IoU 0.726 -> 0.777, better on all five; on
    the trained ``full`` runs of seeds 0-2 no gain (feature selection's amodal IoU 0.797 -> 0.795), so
    off (docs/benchmarks/pilot/README.md)."""
    min_traced: int = 3
    """Patches (and segments) with fewer traced Gaussians (counted as ``count_weight_cap`` says) are kept
    as they are: no merge, no link."""
    min_informative: float = 0.5
    """A view is usable for a patch when at least this share of its traced Gaussians seen there
    are informative (in some mask)."""
    min_seen_fraction: float = 0.2
    """A view is usable for a patch (and counts for linking it) only when at least this share of the
    patch's traced Gaussians are seen there."""
    min_views: int = 2
    """Patches are compared only when at least this many other views are usable for both."""
    link_threshold: float = 0.5
    """Segments of two views are linked when each one's Gaussians map to the other above this."""
    patch_ids: Literal["vote", "merged"] = "vote"
    """merged: a patch's id is its merged component's global id; vote (default): the id most of its
    traced Gaussians are labelled with (after the per-Gaussian vote), so a patch whose component
    was linked wrongly in a few views takes the id its own Gaussians carry across all views
    (measured on generated scenes with SAM-like masks: mean best-match IoU +0.05 on average)."""
    refine: bool = True
    """Training labels are :func:`refine_maps` of the consistent maps (impure patches and patch 0
    take the labels rendered from the Gaussians); False: the patch-level maps as they are."""
    refine_min_purity: float = 0.9
    """:func:`refine_maps`: patches whose purity is below this are split by the rendered labels."""
    refine_fill_unmasked: bool = True
    """:func:`refine_maps`: pixels in no mask (patch 0) take the rendered label."""
    unlink_rounds: int = 0
    """Rounds of: vote, then segments whose traced Gaussians mostly carry another label (segment
    purity below ``unlink_min_purity``) lose all their cross-view links, then link and vote again
    (0: one vote, no unlinking). With ``contrary_weight`` 0.5 rounds helped (generated scenes with
    SAM-like masks, 192 px seeds 0/1/2, 96 px seed 0, refined maps' mean best-match IoU:
    0.849/0.902/0.888/0.802 with 0 rounds, 0.890/0.902/0.890/0.805 with 2). On cluttered scenes they
    cut the wrong links: a box SAM joins with a larger neighbour in 10 of 26 views and with its other
    neighbours in 5 keeps its id through its 7 clean views at first, but the 5 joined segments are
    impure and lose their links, its id then has too few views to win its Gaussians' vote, and its
    clean segments, now labelled as the neighbour, are cut in the next round. With contrary weight 1
    (which makes the views that keep two objects apart count fully), 0 rounds: on the traces of the
    trained ``full`` runs of the ablation (seeds 0/1/2), the Gaussians' labels' mean best-match IoU
    with their ground-truth labels 0.972/0.881/0.853 (count weighting on), 1 round 0.870 mean."""
    unlink_min_purity: float = 0.5
    """See ``unlink_rounds``: below 0.5 most of the segment's Gaussians carry another instance's label
    across the views (0.9, the refinement's purity, cut the links of many correct segments: mean
    0.86 -> 0.75)."""
    vote: Literal["weight", "probability"] = "weight"
    """Per-Gaussian vote in each view where the Gaussian is seen: probability, its probability of each
    patch; weight (default), that times its weight there (alpha * T summed over the view's pixels),
    i.e. the weight it draws in each patch, so a Gaussian showing faintly through a nearer object
    (seen, and traced to the object's patch) says little about its own instance there. Measured on
    generated scenes with SAM-like masks (192 px seeds 0/1/2, 96 px seed 0), refined maps' mean
    best-match IoU: 0.896/0.896/0.908/0.820 with probability, 0.907/0.915/0.917/0.816 with weight
    (weight clipped at 1: seed 2 0.895; its square root: 0.906/0.913/0.925/0.826, not adopted: no
    reason for it beyond the score)."""
    purity_weighted_vote: bool = True
    """After each vote (in every unlinking round), the Gaussians vote again with every patch's votes
    weighted by its purity (the share of its weight drawn by Gaussians carrying its instance's id): a
    patch SAM merged from two objects speaks for its instance only as much as its Gaussians agree
    with it. Measured (as for
    ``unlink_rounds``): 0.890/0.902/0.890/0.805 -> 0.889/0.897/0.907/0.816 (segment purity instead
    of patch purity: the same within 0.001; a second weighted round: within 0.003). Weighting in every
    unlinking round, so that segments are judged by the labels the round ends with, rather than after
    the last round only: 0.907/0.915/0.917/0.816 -> 0.907/0.915/0.917/0.819."""
    view_partition: Literal["segments", "ids"] = "segments"
    """How a view's patches group in the consistent maps (the per-view training labels). ids: patches
    with the same global id are one region, so a segment whose Gaussians carry another object's id
    (e.g. an object SAM joined with a neighbour in a few views, whose instance then wins its vote)
    joins that object in every view, though each view's own merging kept the two apart. segments
    (default): every within-view segment stays a region of its own (see :func:`_separate_segments`):
    it takes its heaviest patch's id, or a new id when a heavier segment of the view holds that one,
    and :func:`refine_maps` does not split it by the rendered labels. The Gaussians' labels are the
    same either way. Measured on the ablation's cluttered scenes (perfect-geometry surface Gaussians,
    ``python -m trace3d_ns.git.consistency --stride 2``, seeds 0/1/2), refined maps' mean per-view
    best-match IoU: 0.639/0.514/0.579 with ids, 0.679/0.595/0.637 with segments (the patches alone:
    0.572/0.539/0.563). Trained (the ablation's ``full`` variant continued from the same RGB stages,
    feature selection), amodal object IoU 0.870/0.641/0.711 with ids, 0.883/0.805/0.726 with segments
    (docs/benchmarks/pilot/README.md). On sparser scenes (192 px, 24 views, perfect geometry) segments
    cost instead: per-view IoU 0.886/0.866/0.885 with ids, 0.869/0.836/0.882 with segments; there, the
    segments sharing an id were ones the view's merging had compared and kept apart (similarity <= the
    threshold), mostly parts of one object that the ids joined."""
    contrary_weight: float = 1.0
    """The per-Gaussian vote also counts votes against: an instance id's score is the Gaussian's votes for
    it minus this times its votes for other instances in the views where that id is present (see
    :func:`_contrary_votes` and the module docstring; 0: votes for only). At 1 an id wins a Gaussian
    only where the views that hold the id put the Gaussian in it more than elsewhere: a small object
    SAM joins with its large neighbour in 10 views and keeps apart in 12 is no longer labelled as the
    neighbour for its 10 joined views (with 0 unlinking rounds and count weighting, on the cluttered
    ablation scenes, perfect geometry: refined maps' mean best-match IoU 0.766/0.604/0.679 at 0.5 and
    2 rounds, 0.789/0.716/0.680 at 1; sparser scenes, 192 px, 5 objects, 24 views, seeds 0/1/2:
    0.879/0.862/0.917 with the earlier merging, 0.897/0.843/0.920 now). Measured earlier at 0.5 (chosen
    before training) on the cluttered ablation scenes (3 seeds): the Gaussians' labels agree more with
    the true objects (perfect geometry, ``python -m trace3d_ns.git.consistency --stride 2``: label
    purity 0.960 -> 0.972, refined maps' mean best-match IoU 0.585 -> 0.613; on the traces of the
    trained ``full`` runs 0.792 -> 0.815, views where one id covers two objects 181 -> 159). The
    ``full`` variant continued from the same RGB stages: instance selection amodal object IoU 0.752 ->
    0.785 and novel-view mIoU 0.728 -> 0.760 (a repeat of weight 0 with another random path: 0.753 /
    0.728); feature selection 0.805 -> 0.793, as the repeat (0.793): within run-to-run noise. On
    sparser scenes (192 px, 5 objects, perfect geometry) label purity rises too (0.994 mean) but the
    maps' mean best-match IoU falls 0.857 -> 0.848: a cone whose masks split it into parts in 7 of 19
    views loses 30% of its Gaussians to a part's id (docs/benchmarks/pilot/README.md)."""
    unmasked_min_share: float = 0.5
    """A Gaussian is labelled 0 (no instance) when patch 0 holds at least this share of its votes, else
    it takes the instance id with the most votes (> 1: only when no view puts it in a mask). Patch 0
    says no mask covers the pixel: SAM missed it, or it is background. With > 1, a large background
    Gaussian seen in three views, in two where no mask is and in one under a neighbour's mask that
    spilled onto it, took that neighbour's id; the refined training maps then gave the neighbour's
    label to the background pixels it draws. Measured on the cluttered 160 px generated scene (seed 0,
    ``full`` run of the ablation; labels recomputed on the same trained model), instance selection,
    amodal object IoU / novel-view mIoU: 0.806 / 0.802 with > 1; 0.876 / 0.821 when 0 competes as
    one more id (plurality); 0.875 / 0.834 with 0.5 (the worst object 0.41 -> 0.90). On perfect
    geometry (``python -m trace3d_ns.git.consistency``, 192 px seed 0), where no such Gaussians exist
    and the rule only costs boundary pixels the masks missed: consistent maps' mean best-match IoU
    0.906 with > 1, 0.895 plurality, 0.900 with 0.5."""


@dataclass
class MergeStats:
    """Size of the merge graph."""

    num_patches: int
    """Non-zero patches over all views."""
    candidate_patches: int
    """Patches with >= min_traced traced Gaussians."""
    within_view_merges: int
    """Patch pairs of one view with similarity above the threshold (graph edges)."""
    num_segments: int
    """Non-zero patch groups after within-view merging."""
    cross_view_links: int
    """Accepted mutual-majority links between segments of different views (graph edges)."""
    num_instances: int
    """Global instance ids (excluding 0)."""
    view_only_ids: int = 0
    """Segments given an id of their own (``view_partition="segments"``): a heavier segment of their
    view holds the id their patches vote for."""


@dataclass
class ConsistentInstances:
    """Consistent instance maps and per-Gaussian instance labels."""

    maps: List[Tensor]
    """One int32 [H, W] map of global ids per view (0 = no instance)."""
    patch_to_global: List[Tensor]
    """Per view, int64 [num_patches[v]]: global id of each patch (entry 0 is 0)."""
    patch_purity: List[Tensor]
    """Per view, float32 [num_patches[v]]: share of the patch's weight (alpha * T drawn in it by the
    seen Gaussians) whose Gaussians' label is the patch's id (1 where no seen Gaussian is drawn in
    it, and for a patch whose id is not its own vote, see ``MergeConfig.view_partition``; 0 for
    patch 0). A low value marks a patch that holds several instances (e.g. neighbours SAM merged in this view), which
    :func:`refine_maps` splits with the rendered labels."""
    gaussian_labels: Tensor  # [N] int64 global id, 0 = none
    gaussian_confidence: Tensor  # [N] float32 in [0, 1]
    stats: MergeStats


def consistent_instances(
    traces: InstanceTraces,
    patch_maps: Sequence[Tensor],
    config: MergeConfig | None = None,
    alike: Optional[Sequence[Optional[np.ndarray]]] = None,  # per view [T_v + 1, T_v + 1] (patch_mask_alike)
) -> ConsistentInstances:
    """Merge patches within views, link them across views and label maps and Gaussians. ``alike``
    (used when ``config.alike_by_masks``): each view's patches that one mask covers together."""
    config = config or MergeConfig()
    if len(patch_maps) != traces.num_views:
        raise ValueError(f"expected {traces.num_views} patch maps, got {len(patch_maps)}")
    if alike is not None and len(alike) != traces.num_views:
        raise ValueError(f"expected {traces.num_views} alike matrices (one per view), got {len(alike)}")
    t = _TraceArrays(traces, config)
    alike_all = _alike_matrix(alike, t) if config.alike_by_masks and alike is not None else None  # [P, P]

    traced = t.traced_matrix()  # [P, N]
    cotrace = _drop_same_view((traced @ t.distribution_matrix()).tocoo(), t.patch_view)  # [P, P]
    own = (np.arange(t.num_nodes), t.patch_view)
    seen = (traced @ t.view_matrix(t.seen)).toarray()  # [P, L] n_a^v'
    informative = (traced @ t.view_matrix(t.informative)).toarray()  # [P, L] m_a^v'
    seen[own], informative[own] = 0.0, 0.0
    num_traced = np.asarray(traced.sum(axis=1)).ravel()  # [P]
    candidate = (num_traced >= config.min_traced) & (t.patch_local > 0)  # [P]

    merge_edges = _within_view_merges(cotrace, seen, informative, num_traced, t, config, alike_all)  # [2, m]
    segment = union_find(t.num_nodes, torch.from_numpy(merge_edges)).numpy()  # [P] root patch
    real = t.patch_local > 0  # [P] patch 0 of a view is no instance
    linkable = np.ones(t.num_nodes, dtype=bool)  # [P] by segment root
    for round_ in range(config.unlink_rounds + 1):
        linked = real & linkable[segment]  # [P] impure segments take part in no link
        links = _cross_view_links(cotrace, seen, num_traced, segment, t.patch_view, linked, config)  # [2, k]
        edges = np.concatenate([merge_edges, links], axis=1)  # [2, m + k]
        root = union_find(t.num_nodes, torch.from_numpy(edges)).numpy()
        global_id = _compact(root, real)  # [P], 0 for patch 0
        labels, confidence = _gaussian_votes(t, global_id, config)
        if config.purity_weighted_vote:
            weight = _patch_purity(t, labels, global_id)  # [P]
            weight[~real] = 1.0  # patch 0 votes "no mask here" as before
            labels, confidence = _gaussian_votes(t, global_id, config, weight)
        if round_ == config.unlink_rounds:
            break
        spur = _segment_purity(t, labels, global_id, segment, config.min_traced)
        impure = real & (spur[segment] < config.unlink_min_purity)
        if not (impure & linkable[segment]).any():
            break
        linkable[segment[impure]] = False
    if config.patch_ids == "vote":
        global_id, labels = _renumber(_patch_votes(t, labels, global_id), labels)
    purity = _patch_purity(t, labels, global_id)
    num_instances = int(global_id.max(initial=0))
    view_only_ids = 0
    if config.view_partition == "segments":
        in_use = max(num_instances, int(labels.max(initial=0)))
        view_id = _separate_segments(global_id, segment, num_traced, t.patch_view, real, in_use)
        purity[(view_id != global_id) & real] = 1.0  # the view's own boundaries stand: refine_maps keeps them
        global_id = view_id
        view_only_ids = int((np.unique(global_id) > in_use).sum())
    luts = [torch.from_numpy(global_id[t.base[v] : t.base[v + 1]]) for v in range(traces.num_views)]

    device = traces.device
    maps = [lut.to(m.device)[m.long()].int() for lut, m in zip(luts, patch_maps)]
    stats = MergeStats(
        num_patches=int(real.sum()),
        candidate_patches=int(candidate.sum()),
        within_view_merges=merge_edges.shape[1],
        num_segments=len(np.unique(segment[real])),
        cross_view_links=links.shape[1],
        num_instances=num_instances,
        view_only_ids=view_only_ids,
    )
    return ConsistentInstances(
        maps=maps,
        patch_to_global=[lut.to(device) for lut in luts],
        patch_purity=[torch.from_numpy(purity[t.base[v] : t.base[v + 1]]).to(device) for v in range(traces.num_views)],
        gaussian_labels=torch.from_numpy(labels).to(device),
        gaussian_confidence=torch.from_numpy(confidence).to(device),
        stats=stats,
    )


@torch.no_grad()
def refine_maps(
    result: ConsistentInstances,
    patch_maps: Sequence[Tensor],
    contributions: Callable[[int], Contributions],
    min_purity: float = 0.9,
    fill_unmasked: bool = True,
) -> List[Tensor]:
    """Consistent maps split and filled with the per-Gaussian labels: in every view, the pixels of
    patches whose purity is below ``min_purity`` (a patch holding several instances, which no
    merging can split) and, with ``fill_unmasked``, the pixels of patch 0 (in no mask, e.g. an object
    SAM missed in this view) take the label rendered from the Gaussians (:func:`render_label_map`);
    every other pixel keeps its patch's id, so the view's own 2D boundaries stay where they are
    trustworthy. ``contributions(v)`` gives view ``v``'s contributions at the patch map's
    resolution. Returns one int32 [H, W] map per view (the training labels).

    Measured on generated scenes with SAM-like masks (96 px, 21 training views, 3 seeds), mean
    best-match IoU: merged patch ids 0.60, voted patch ids 0.66, refined maps 0.70."""
    out = []
    for v, (patch_map, lut, purity) in enumerate(zip(patch_maps, result.patch_to_global, result.patch_purity)):
        patch = patch_map.long().to(lut.device)
        ids = lut[patch]  # [H, W]
        replace = (purity[patch] < min_purity) & (patch > 0)
        if fill_unmasked:
            replace |= patch == 0
        if bool(replace.any()):
            rendered = render_label_map(contributions(v), result.gaussian_labels).to(ids.device).long()
            ids = torch.where(replace, rendered, ids)
        out.append(ids.int().to(patch_map.device))
    return out


@torch.no_grad()
def render_label_map(contrib: Contributions, gaussian_labels: Tensor, min_alpha: float = 0.5) -> Tensor:
    """Per-pixel instance id [H, W] int32 of one view from per-Gaussian labels: the label with the
    largest summed alpha * T among the pixel's contributions; 0 where the pixel's accumulated alpha
    is below ``min_alpha`` (nothing solid is drawn there).

    Rendering the 3D labels splits what a view's patches under-segment (two objects SAM merged in
    that view carry different labels in 3D) and fills what they miss; the merged-patch maps of
    :func:`consistent_instances` keep the view's own 2D boundaries."""
    num_labels = int(gaussian_labels.max()) + 1 if gaussian_labels.numel() else 1
    labels = gaussian_labels.to(contrib.gaussian_ids.device)[contrib.gaussian_ids]  # [P]
    keys, inverse = torch.unique(contrib.pixel_ids * num_labels + labels, return_inverse=True)  # [U]
    votes = torch.zeros(keys.numel(), device=keys.device).index_add_(0, inverse, contrib.weights)
    pixel = torch.div(keys, num_labels, rounding_mode="floor")
    order = torch.argsort(votes, descending=True, stable=True)
    order = order[torch.argsort(pixel[order], stable=True)]  # per pixel, most votes first
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = pixel[order][1:] != pixel[order][:-1]
    num_pixels = contrib.height * contrib.width
    alpha = torch.zeros(num_pixels, device=keys.device).index_add_(0, contrib.pixel_ids, contrib.weights)  # [H*W]
    out = torch.zeros(num_pixels, dtype=torch.int32, device=keys.device)
    out[pixel[order][first]] = (keys - pixel * num_labels)[order][first].int()
    out[alpha < min_alpha] = 0
    return out.reshape(contrib.height, contrib.width)


@torch.no_grad()
def union_find(num_nodes: int, edges: Tensor) -> Tensor:
    """Connected components of an undirected graph: root (smallest node id) of every node. [num_nodes]

    Vectorized union-find: every edge hooks the larger of its two roots under the smaller one
    (``scatter_reduce`` amin, so concurrent hooks of one root keep the smallest), then pointer
    jumping compresses every path to its root; repeated until no edge joins two roots. Parents
    only decrease, so there are no cycles and it terminates.

    Args:
        num_nodes: node count.
        edges: [2, E] int node pairs.
    """
    parent = torch.arange(num_nodes, device=edges.device)
    u, v = edges.long()
    while True:
        ru, rv = parent[u], parent[v]
        lo, hi = torch.minimum(ru, rv), torch.maximum(ru, rv)
        joining = lo != hi
        if not bool(joining.any()):
            return parent
        parent = parent.scatter_reduce(0, hi[joining], lo[joining], reduce="amin")
        while True:  # path compression: point every node at its root
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand


class _TraceArrays:
    """The store's observations and entries as numpy arrays, with global patch indices."""

    def __init__(self, traces: InstanceTraces, config: MergeConfig) -> None:
        self.num_gaussians = traces.num_gaussians
        self.num_views = traces.num_views
        num_patches = traces.num_patches.cpu().numpy()
        self.base = np.concatenate([[0], np.cumsum(num_patches)])  # [L + 1] first global patch of each view
        self.num_nodes = int(self.base[-1])
        self.patch_view = np.repeat(np.arange(self.num_views), num_patches)  # [P]
        self.patch_local = np.arange(self.num_nodes) - self.base[self.patch_view]  # [P]

        self.obs_gaussian = traces.obs_gaussian().cpu().numpy()  # [O]
        self.obs_view = traces.obs_view.cpu().numpy().astype(np.int64)  # [O]
        self.obs_weight = traces.obs_weight.float().cpu().numpy()  # [O]
        self.seen = self.obs_weight >= config.min_weight  # [O]
        cap = config.count_weight_cap
        if not cap >= 0.0:
            raise ValueError(f"MergeConfig.count_weight_cap must be >= 0 (0: count every Gaussian 1), got {cap}")
        # [O] what each observation counts for in merging and linking (see the module docstring)
        self.count = np.minimum(self.obs_weight, cap) / cap if cap > 0 else np.ones_like(self.obs_weight)
        top = traces.argmax().cpu().numpy()  # [O]
        self.informative = self.seen & (top > 0)  # [O]
        self.traced = self.informative & (traces.max_prob().cpu().numpy() >= config.traced_min_prob)  # [O]
        self.obs_top = self.base[self.obs_view] + top  # [O] global patch

        entry_obs, entry_patch, entry_prob = (x.cpu().numpy() for x in traces.entries())  # each [E]
        self.entry_obs = entry_obs
        self.entry_patch = self.base[self.obs_view[entry_obs]] + entry_patch  # [E] global
        self.entry_prob = entry_prob  # [E]
        self.entry_local = entry_patch  # [E]

    def traced_matrix(self) -> sp.csr_matrix:
        """M [P, N]: where Gaussian n is traced to patch p, its count in p's view (``count``)."""
        rows, cols = self.obs_top[self.traced], self.obs_gaussian[self.traced]
        return sp.csr_matrix((self.count[self.traced], (rows, cols)), shape=(self.num_nodes, self.num_gaussians))

    def distribution_matrix(self) -> sp.csr_matrix:
        """D [N, P]: W[n, p] over the non-zero patches of the views where n is informative, times n's
        count in that view."""
        keep = self.informative[self.entry_obs] & (self.entry_local > 0)
        rows, cols = self.obs_gaussian[self.entry_obs[keep]], self.entry_patch[keep]
        values = self.entry_prob[keep] * self.count[self.entry_obs[keep]]
        return sp.csr_matrix((values, (rows, cols)), shape=(self.num_gaussians, self.num_nodes))

    def view_matrix(self, obs: np.ndarray) -> sp.csr_matrix:
        """[N, L]: the counts of the observations selected by the bool mask ``obs`` [O], 0 elsewhere."""
        rows, cols = self.obs_gaussian[obs], self.obs_view[obs]
        return sp.csr_matrix((self.count[obs], (rows, cols)), shape=(self.num_gaussians, self.num_views))


def _drop_same_view(m: sp.coo_matrix, patch_view: np.ndarray) -> sp.csr_matrix:
    """Zero the entries whose row and column patches belong to the same view."""
    keep = patch_view[m.row] != patch_view[m.col]
    return sp.csr_matrix((m.data[keep], (m.row[keep], m.col[keep])), shape=m.shape)


def _alike_matrix(alike: Sequence[Optional[np.ndarray]], t: "_TraceArrays") -> sp.csr_matrix:
    """[P, P] over the global patches: each view's alike block (identity where a view has none or
    one for another patch count), 0 across views."""
    blocks = []
    for v in range(t.num_views):
        size = int(t.base[v + 1] - t.base[v])
        a = alike[v]
        ok = a is not None and np.asarray(a).shape == (size, size)
        blocks.append(sp.csr_matrix(np.asarray(a, dtype=np.float64)) if ok else sp.identity(size, format="csr"))
    return sp.block_diag(blocks, format="csr") if blocks else sp.csr_matrix((0, 0))


def _within_view_merges(
    cotrace: sp.csr_matrix,
    seen: np.ndarray,
    informative: np.ndarray,
    num_traced: np.ndarray,
    t: "_TraceArrays",
    config: MergeConfig,
    alike: Optional[sp.csr_matrix] = None,  # [P, P] global patches one mask covers together, or None
) -> np.ndarray:
    """Greedy average-linkage merging inside every view; returns the merge edges [2, m] (global
    patch indices). A merged group's ``C`` row and counts are the sums of its members', so a sliver
    patch similar to two neighbours can join one of them but cannot bridge them."""
    edges = []
    for v in range(t.num_views):
        lo, hi = int(t.base[v]) + 1, int(t.base[v + 1])  # patch 0 never merges
        if hi - lo < 2:
            continue
        block = cotrace[lo:hi]
        cols = np.unique(block.indices)  # the patches of other views this view's patches reach
        groups = _Groups(
            block[:, cols].toarray(), seen[lo:hi].copy(), informative[lo:hi].copy(), num_traced[lo:hi].copy(),
            t.patch_view[cols], config, None if alike is None else alike[cols][:, cols].toarray(),
        )
        edges.extend((lo + a, lo + b) for a, b in groups.merge_greedily())
    return np.array(edges, dtype=np.int64).T.reshape(2, -1)


class _Groups:
    """Patches of one view being merged; rows are summed when groups merge."""

    def __init__(
        self, cotrace: np.ndarray, seen: np.ndarray, informative: np.ndarray, traced: np.ndarray,
        col_view: np.ndarray, config: MergeConfig, alike: Optional[np.ndarray] = None,
    ) -> None:
        self.c, self.n, self.m, self.traced = cotrace, seen, informative, traced  # [T, c], [T, L], [T, L], [T]
        self.col_view, self.config = col_view, config
        self.alike = alike  # [c, c] columns one mask covers together, or None: a column is alike only to itself
        self.alive = traced >= config.min_traced  # [T] candidates
        self.sim = np.full((len(traced), len(traced)), -np.inf)  # [T, T] -inf: not mergeable
        rows = np.flatnonzero(self.alive)
        self.sim[np.ix_(rows, rows)] = self._similarity(rows, rows)
        np.fill_diagonal(self.sim, -np.inf)

    def _similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Similarity [len(a), len(b)] of groups a and b; -inf where fewer than min_views views are usable."""
        cfg = self.config
        usable = (self.m > 0) & (self.m >= cfg.min_informative * self.n)  # [T, L]
        usable &= self.n >= cfg.min_seen_fraction * self.traced[:, None]
        u = usable.astype(np.float64)
        if cfg.similarity == "views":
            where = usable[:, self.col_view]  # [T, c]
            mean = np.divide(self.c, self.m[:, self.col_view], out=np.zeros_like(self.c), where=where)
            right = mean[b] if self.alike is None else mean[b] @ self.alike
            num, den = mean[a] @ right.T, u[a] @ u[b].T
        else:
            masked = self.c * usable[:, self.col_view]
            mu = self.m * u
            right = masked[b] if self.alike is None else masked[b] @ self.alike
            num, den = masked[a] @ right.T, mu[a] @ mu[b].T
        views = u[a] @ u[b].T
        sim = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        return np.where(views >= cfg.min_views, sim, -np.inf)

    def merge_greedily(self) -> List[tuple]:
        """Merge the most similar pair while its similarity exceeds the threshold; the merged pairs."""
        merged = []
        while True:
            flat = int(np.argmax(self.sim))
            i, j = divmod(flat, self.sim.shape[1])
            if not self.sim[i, j] > self.config.merge_threshold:
                return merged
            merged.append((i, j))
            self.c[i] += self.c[j]
            self.n[i] += self.n[j]
            self.m[i] += self.m[j]
            self.traced[i] += self.traced[j]
            self.alive[j] = False
            self.sim[j, :] = self.sim[:, j] = -np.inf
            rows = np.flatnonzero(self.alive)
            row = self._similarity(np.array([i]), rows)[0]
            self.sim[i, rows] = self.sim[rows, i] = row
            self.sim[i, i] = -np.inf


def _cross_view_links(
    cotrace: sp.csr_matrix, seen: np.ndarray, num_traced: np.ndarray, segment: np.ndarray, patch_view: np.ndarray,
    real: np.ndarray, config: MergeConfig,
) -> np.ndarray:
    """Accepted mutual-majority links [2, k] between segments (named by their root patch)."""
    num_nodes = len(segment)
    agg = sp.csr_matrix((real.astype(np.float64), (segment, np.arange(num_nodes))), shape=(num_nodes, num_nodes))
    co = (agg @ cotrace @ agg.T).tocoo()  # [S, S] summed over member patches, indexed by root patch
    n = agg @ seen  # [S, L] traced Gaussians of a segment seen in each view
    traced = agg @ num_traced  # [S]
    n_row = n[co.row, patch_view[co.col]]  # the row segment's Gaussians seen in the column's view
    enough = (n_row >= config.min_traced) & (n_row >= config.min_seen_fraction * traced[co.row])
    frac = np.where(enough, co.data / np.maximum(n_row, 1.0), 0.0)  # f(row -> col)
    f = sp.csr_matrix((frac, (co.row, co.col)), shape=co.shape)
    mutual = f.minimum(f.T).tocoo()  # min(f(s -> s'), f(s' -> s))
    keep = (mutual.data > config.link_threshold) & (mutual.row < mutual.col)
    rows, cols = mutual.row[keep], mutual.col[keep]  # [c]
    shared = sp.csr_matrix((co.data, (co.row, co.col)), shape=co.shape)
    # Gaussians shared both ways; scipy answers an empty pair index with one element, hence the guard
    evidence = np.asarray(shared.minimum(shared.T)[rows, cols]).ravel() if rows.size else np.zeros(0)
    order = np.lexsort((-evidence, -mutual.data[keep]))  # most mutual first, then most shared Gaussians
    candidates = np.stack([rows[order], cols[order]])  # [2, c] strongest first
    views = np.zeros((num_nodes, len(n[0]) if len(n) else 0), dtype=bool)  # [S, L] views of each component
    views[segment[real], patch_view[real]] = True
    return constrained_links(candidates, views)


def constrained_links(candidates: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Greedy union-find over ``candidates`` [2, c] (strongest first): a link is accepted unless
    the two components it joins already hold segments of a common view (within-view merging
    decided those are different instances). ``views`` [S, L] says which views each node's segment
    is in. Union-find with path compression; returns the accepted links [2, k]."""
    parent = np.arange(len(views))
    views = views.copy()

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    accepted = []
    for a, b in candidates.T:
        ra, rb = find(int(a)), find(int(b))
        if ra == rb or (views[ra] & views[rb]).any():
            continue
        parent[rb] = ra
        views[ra] |= views[rb]
        accepted.append((a, b))
    return np.array(accepted, dtype=np.int64).T.reshape(2, -1)


def _compact(root: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Component roots [P] -> ids 1..G in order of first node; 0 where not ``real``."""
    out = np.zeros(len(root), dtype=np.int64)
    roots, first = np.unique(root[real], return_index=True)
    rank = np.empty(len(roots), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(1, len(roots) + 1)
    out[real] = rank[np.searchsorted(roots, root[real])]
    return out


def _patch_votes(t: _TraceArrays, labels: np.ndarray, global_id: np.ndarray) -> np.ndarray:
    """Global id [P] of every real patch: the non-zero label most of its traced Gaussians carry,
    each Gaussian by its count (``_TraceArrays.count``; ties: the smaller id); patches with no
    labelled traced Gaussian keep ``global_id``."""
    out = global_id.copy()
    g, p, w = t.obs_gaussian[t.traced], t.obs_top[t.traced], t.count[t.traced]
    lab = labels[g]
    keep = (lab > 0) & (t.patch_local[p] > 0)
    if not keep.any():
        return out
    span = int(labels.max()) + 1
    keys, inverse = np.unique(p[keep] * span + lab[keep], return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=w[keep], minlength=len(keys))
    patch, label = keys // span, keys % span
    order = np.lexsort((label, -counts, patch))  # per patch: most votes first, then smaller id
    first = order[np.r_[True, patch[order][1:] != patch[order][:-1]]]
    out[patch[first]] = label[first]
    return out


def _separate_segments(
    global_id: np.ndarray, segment: np.ndarray, num_traced: np.ndarray, patch_view: np.ndarray, real: np.ndarray,
    max_label: int,
) -> np.ndarray:
    """Ids [P] under which every within-view segment stays one region of its view: a segment takes
    the id of its heaviest patch (most traced Gaussians; ties: the first patch); when a heavier
    segment of the same view (more traced Gaussians in all; ties: the first) already holds that
    id, it gets a new id above every id in use (> ``max_label`` and ``global_id``), in order of
    (view, segment). Patch 0 of every view stays 0."""
    out = np.zeros_like(global_id)
    patches = np.flatnonzero(real)
    if patches.size == 0:
        return out
    seg = segment[patches]
    order = np.lexsort((patches, -num_traced[patches], seg))  # per segment: heaviest patch first
    first = order[np.r_[True, seg[order][1:] != seg[order][:-1]]]
    roots, heaviest = seg[first], patches[first]  # [S] (roots ascending)
    weight = np.bincount(np.searchsorted(roots, seg), weights=num_traced[patches], minlength=len(roots))  # [S]
    ids, views = global_id[heaviest].copy(), patch_view[roots]  # [S]
    rank = np.lexsort((roots, -weight, ids, views))  # per (view, id): heaviest segment first
    clash = np.zeros(len(roots), dtype=bool)
    clash[rank[1:]] = (views[rank][1:] == views[rank][:-1]) & (ids[rank][1:] == ids[rank][:-1])
    clash |= ids == 0
    fresh = np.flatnonzero(clash)
    fresh = fresh[np.lexsort((roots[fresh], views[fresh]))]
    ids[fresh] = max(max_label, int(global_id.max())) + 1 + np.arange(len(fresh))
    out[patches] = ids[np.searchsorted(roots, seg)]
    return out


def _renumber(global_id: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids 1..G in order of first (view, patch), then of first Gaussian for ids only Gaussians carry;
    0 stays 0. Returns (global_id [P], labels [N]) renumbered."""
    seq = np.concatenate([global_id, labels])
    ids, first = np.unique(seq, return_index=True)
    nonzero = ids > 0
    rank = np.zeros(len(ids), dtype=np.int64)
    rank[np.flatnonzero(nonzero)[np.argsort(first[nonzero], kind="stable")]] = np.arange(1, int(nonzero.sum()) + 1)
    new = rank[np.searchsorted(ids, seq)]
    return new[: len(global_id)], new[len(global_id) :]


def _patch_purity(t: _TraceArrays, labels: np.ndarray, global_id: np.ndarray) -> np.ndarray:
    """Share [P] of each patch's weight (the alpha * T of the seen Gaussians drawn in it, i.e. its
    pixels' rendered mass) carried by Gaussians labelled with the patch's id (1 for a patch no seen
    Gaussian is drawn in, 0 for patch 0). Weighted, not counted: Gaussians of a surface behind the
    patch's object, traced to the patch through the object's partial opacity, count by what they
    draw there (counted, they made objects' own patches look impure: refined maps' mean best-match
    IoU 0.889/0.897/0.907/0.816 with counts, 0.896/0.896/0.908/0.820 weighted)."""
    keep = t.seen[t.entry_obs]
    obs, patch = t.entry_obs[keep], t.entry_patch[keep]
    mass = t.entry_prob[keep] * t.obs_weight[obs]
    agree = labels[t.obs_gaussian[obs]] == global_id[patch]
    num = np.bincount(patch, weights=mass * agree, minlength=t.num_nodes)
    den = np.bincount(patch, weights=mass, minlength=t.num_nodes)
    purity = np.divide(num, den, out=np.ones(t.num_nodes), where=den > 0)
    purity[t.patch_local == 0] = 0.0
    return purity.astype(np.float32)


def _segment_purity(
    t: _TraceArrays, labels: np.ndarray, global_id: np.ndarray, segment: np.ndarray, min_traced: int
) -> np.ndarray:
    """Share [P] (indexed by segment root) of each segment's traced Gaussians labelled with the
    segment's id (1 below ``min_traced`` traced Gaussians or for non-roots)."""
    g, p = t.obs_gaussian[t.traced], t.obs_top[t.traced]
    real = t.patch_local[p] > 0
    g, p = g[real], p[real]
    agree = np.bincount(segment[p], weights=(labels[g] == global_id[p]).astype(np.float64), minlength=t.num_nodes)
    total = np.bincount(segment[p], minlength=t.num_nodes).astype(np.float64)
    return np.where(total >= max(min_traced, 1), agree / np.maximum(total, 1.0), 1.0)


def _gaussian_votes(
    t: _TraceArrays, global_id: np.ndarray, config: MergeConfig, patch_weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-Gaussian winning global id [N] and its share of the votes [N] (see module docstring): a
    vote is the Gaussian's probability of each patch, times its weight in the view with
    ``config.vote == "weight"``; ``patch_weight`` [P] scales each patch's votes; id 0 wins with
    ``config.unmasked_min_share`` of the votes, or when no instance id has any. With
    ``config.contrary_weight`` an instance id's score is its votes minus that times the Gaussian's votes for other
    instances in the views where that id is present (see :func:`_contrary_votes`)."""
    keep = t.seen[t.entry_obs]
    gaussian = t.obs_gaussian[t.entry_obs[keep]]  # [e]
    ids = global_id[t.entry_patch[keep]]  # [e]
    weight = t.entry_prob[keep] if patch_weight is None else t.entry_prob[keep] * patch_weight[t.entry_patch[keep]]
    if config.vote == "weight":
        weight = weight * t.obs_weight[t.entry_obs[keep]]
    span = int(global_id.max()) + 1 if global_id.size else 1
    keys, inverse = np.unique(gaussian * span + ids, return_inverse=True)
    votes = np.bincount(inverse.ravel(), weights=weight, minlength=len(keys))  # [u]
    owner, label = keys // span, keys % span
    total = np.bincount(owner, weights=votes, minlength=t.num_gaussians)  # [N]
    score = votes
    if config.contrary_weight > 0:
        against = _contrary_votes(t, global_id, owner, label, votes, t.entry_obs[keep], ids, weight)  # [u]
        score = votes - config.contrary_weight * against
    order = np.lexsort((-score, label == 0, owner))  # per Gaussian: instance ids first, best score first
    first = order[np.r_[True, owner[order][1:] != owner[order][:-1]]] if len(order) else order
    labels = np.zeros(t.num_gaussians, dtype=np.int64)
    best = np.zeros(t.num_gaussians)
    labels[owner[first]], best[owner[first]] = label[first], votes[first]
    zero = np.bincount(owner[label == 0], weights=votes[label == 0], minlength=t.num_gaussians)  # [N]
    background = (zero > 0) & (zero >= config.unmasked_min_share * total)  # [N]
    labels[background], best[background] = 0, zero[background]
    confidence = np.divide(best, total, out=np.zeros_like(best), where=total > 0).astype(np.float32)
    return labels, confidence


def _contrary_votes(
    t: _TraceArrays, global_id: np.ndarray, owner: np.ndarray, label: np.ndarray, votes: np.ndarray,
    entry_obs: np.ndarray, entry_id: np.ndarray, entry_weight: np.ndarray, block: int = 1 << 16,
) -> np.ndarray:
    """Votes [u] against each (Gaussian ``owner``, instance ``label``) pair: the Gaussian's votes for
    other instances (ids > 0) in the views where ``label`` is present (held by a segment of the
    view). Such a view kept the Gaussian's own segment apart from that instance's: within-view
    merging compared the two and found them different. 0 for label 0."""
    nonzero = entry_id > 0
    obs_votes = np.bincount(entry_obs[nonzero], weights=entry_weight[nonzero], minlength=len(t.obs_view))  # [O]
    nz = sp.csr_matrix((obs_votes, (t.obs_gaussian, t.obs_view)), shape=(t.num_gaussians, t.num_views))  # [N, L]
    real = t.patch_local > 0
    present = sp.csr_matrix(
        (np.ones(int(real.sum())), (t.patch_view[real], global_id[real])), shape=(t.num_views, int(global_id.max()) + 1)
    )
    present.sum_duplicates()
    present.data[:] = 1.0  # [L, G] several patches of one segment: still 1
    against = np.zeros(len(owner))
    for lo in range(0, t.num_gaussians, block):  # [block, G] at a time; owner is sorted
        first, last = np.searchsorted(owner, [lo, lo + block])
        rows = first + np.flatnonzero(label[first:last] > 0)
        if rows.size == 0:
            continue
        reach = (nz[lo : lo + block] @ present).tocsr()  # [block, G] votes in the views where each id is present
        against[rows] = np.asarray(reach[owner[rows] - lo, label[rows]]).ravel()
    return np.maximum(against - votes * (label > 0), 0.0)
