"""Consistent instance maps on hand-built traces: granularity merges, distinct objects, one-view merges."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from trace3d_ns.git.merging import MergeConfig, consistent_instances, constrained_links, render_label_map, union_find
from trace3d_ns.git.tracing import TraceAccumulator
from trace3d_ns.rendering import Contributions

# Three objects of 20 Gaussians each.
A, B, C = range(0, 20), range(20, 40), range(40, 60)
N = 60


def _view(groups: list[list[int]]) -> tuple[Contributions, torch.Tensor]:
    """A synthetic view whose patch k + 1 holds exactly the Gaussians of ``groups[k]`` (weight 1
    each, one pixel per patch); Gaussians in no group are unseen. Returns contributions and the
    [1, K + 1] patch map (pixel j is patch j)."""
    gids = torch.tensor([g for group in groups for g in group])
    pixels = torch.tensor([k + 1 for k, group in enumerate(groups) for _ in group])
    contrib = Contributions(gids, pixels, torch.ones(len(gids)), len(groups) + 1, 1)
    return contrib, torch.arange(len(groups) + 1, dtype=torch.int32)[None]


def _run(views: list[list[list[int]]], config: MergeConfig | None = None, alike=None):
    acc = TraceAccumulator(N, len(views))
    maps = []
    for v, groups in enumerate(views):
        contrib, patch_map = _view(groups)
        acc.add_view(v, contrib, patch_map)
        maps.append(patch_map)
    return consistent_instances(acc.build(), maps, config or MergeConfig(min_traced=3), alike)


def _whole() -> list[list[int]]:
    return [list(A), list(B), list(C)]


def test_granularity_disagreement_is_merged_and_ids_are_global():
    # View 0 splits A in two parts; the other five views see A whole.
    views = [[list(A)[:10], list(A)[10:], list(B), list(C)]] + [_whole() for _ in range(5)]
    result = _run(views)
    lut0 = result.patch_to_global[0]
    assert lut0[1] == lut0[2] != 0  # the two parts of A are one instance
    ids = {v: result.patch_to_global[v].tolist() for v in range(6)}
    for v in range(1, 6):
        assert ids[v][1] == lut0[1] and ids[v][2] == lut0[3] and ids[v][3] == lut0[4]
    assert len({int(lut0[1]), int(lut0[3]), int(lut0[4])}) == 3  # A, B, C distinct
    assert result.stats.num_instances == 3
    assert torch.equal(result.maps[0], lut0[torch.arange(5)][None].int())
    # Every Gaussian is labelled with its object's id, with full confidence.
    expected = torch.tensor([int(lut0[1])] * 20 + [int(lut0[3])] * 20 + [int(lut0[4])] * 20)
    assert torch.equal(result.gaussian_labels, expected)
    assert torch.allclose(result.gaussian_confidence, torch.ones(N))


def test_distinct_objects_stay_apart():
    result = _run([_whole() for _ in range(6)])
    for v in range(6):
        assert len(set(result.patch_to_global[v][1:].tolist())) == 3
        assert result.patch_to_global[v].tolist() == result.patch_to_global[0].tolist()
    assert result.stats.within_view_merges == 0 and result.stats.num_instances == 3


def test_neighbours_merged_in_one_view_only_are_not_merged():
    # View 1 sees B and C as one patch (SAM merged the neighbours); five views separate them.
    views = [_whole() for _ in range(6)]
    views[1] = [list(A), list(B) + list(C)]
    result = _run(views)
    lut = result.patch_to_global
    b_id, c_id = int(lut[0][2]), int(lut[0][3])
    assert b_id != c_id
    for v in (0, 2, 3, 4, 5):
        assert int(lut[v][2]) == b_id and int(lut[v][3]) == c_id
    assert int(lut[1][2]) != int(lut[0][1])  # the merged B+C patch is not A
    labels = result.gaussian_labels
    assert torch.all(labels[list(B)] == b_id) and torch.all(labels[list(C)] == c_id)


def test_unmasked_patch_zero_is_no_instance():
    # In view 0 object C is in no mask (patch 0): it must map to 0 and not disturb the others.
    acc = TraceAccumulator(N, 4)
    maps = []
    for v in range(4):
        contrib, patch_map = _view(_whole())
        if v == 0:
            patch_map = torch.tensor([[0, 1, 2, 0]], dtype=torch.int32)
        acc.add_view(v, contrib, patch_map)
        maps.append(patch_map)
    result = consistent_instances(acc.build(), maps, MergeConfig(min_traced=3))
    assert result.maps[0].tolist() == [[0, int(result.patch_to_global[1][1]), int(result.patch_to_global[1][2]), 0]]
    assert all(int(lut[0]) == 0 for lut in result.patch_to_global)
    assert result.stats.num_instances == 3


def test_pairs_similarity_is_the_paper_mean_over_pairs():
    # A patch half of whose Gaussians agree with the other's in every view: mean <W, W> = 0.5, not > 0.5.
    mixed = [list(A)[:5] + list(A)[10:15], list(A)[5:10] + list(A)[15:]]
    views = [[list(A)[:10], list(A)[10:]]] + [mixed for _ in range(4)]
    for similarity in ("pairs", "views"):  # the merge decision itself: merged-component ids, no vote
        result = _run(views, MergeConfig(min_traced=3, similarity=similarity, patch_ids="merged"))
        assert result.patch_to_global[0][1] != result.patch_to_global[0][2]
        result = _run(views, MergeConfig(min_traced=3, similarity=similarity, merge_threshold=0.45, patch_ids="merged"))
        assert result.patch_to_global[0][1] == result.patch_to_global[0][2]


def test_union_find_is_transitive():
    edges = torch.tensor([[0, 2, 1, 5, 9], [1, 3, 2, 6, 9]])
    roots = union_find(10, edges)
    assert roots.tolist() == [0, 0, 0, 0, 4, 5, 5, 7, 8, 9]
    # A long chain in shuffled order collapses to one component rooted at its smallest node.
    n = 2000
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    chain = torch.stack([perm[:-1], perm[1:]])
    assert torch.all(union_find(n, chain) == 0)


def test_constrained_links_never_join_two_segments_of_one_view():
    # Segments 0, 1 are in view 0; 2 in view 1; 3 in view 2. Links 0-2 (strongest), 2-1, 1-3.
    views = np.zeros((4, 3), dtype=bool)
    views[[0, 1, 2, 3], [0, 0, 1, 2]] = True
    accepted = constrained_links(np.array([[0, 2, 1], [2, 1, 3]]), views)
    assert accepted.T.tolist() == [[0, 2], [1, 3]]  # 2-1 would put segments 0 and 1 together


def test_render_label_map_takes_the_heaviest_label():
    contrib = Contributions(
        torch.tensor([0, 1, 2, 1, 2]), torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0.5, 0.3, 0.3, 0.2, 0.1]), 3, 1
    )
    labels = torch.tensor([4, 7, 7])
    assert render_label_map(contrib, labels, min_alpha=0.0).tolist() == [[7, 7, 0]]  # 0.6 beats 0.5; pixel 2 empty
    assert render_label_map(contrib, labels).tolist() == [[7, 0, 0]]  # pixel 1 is too faint (alpha 0.3 < 0.5)

def _three_distinct_instances(result) -> list:
    """The instance ids of objects A, B, C; asserts each object has one id of its own (never 0)."""
    labels = result.gaussian_labels
    ids = [int(labels[list(obj)].mode().values) for obj in (A, B, C)]
    assert len(set(ids)) == 3 and 0 not in ids
    for obj, i in zip((A, B, C), ids):
        assert torch.all(labels[list(obj)] == i)
    return ids


def test_bridging_segment_in_one_view_does_not_fuse_objects_kept_apart_elsewhere():
    # View 1 has one segment over B and C (SAM merged them); view 2 has one over A and B. Every other
    # view keeps A, B and C apart: the bridges must not chain A, B, C into one instance.
    views = [_whole() for _ in range(6)]
    views[1] = [list(A), list(B) + list(C)]
    views[2] = [list(A) + list(B), list(C)]
    result = _run(views)
    ids = _three_distinct_instances(result)
    for v in (0, 3, 4, 5):
        assert result.patch_to_global[v][1:].tolist() == ids
    # The bridging patches take one of their objects' ids and are marked impure (half their Gaussians).
    assert int(result.patch_to_global[1][2]) in ids[1:] and float(result.patch_purity[1][2]) == 0.5
    assert float(result.patch_purity[0][1]) == 1.0


def test_patch_takes_the_id_its_gaussians_carry():
    # With merged-component ids a patch keeps its component's id; with votes, the label its traced
    # Gaussians carry. Here they agree on clean data, and both keep distinct objects apart.
    for patch_ids in ("merged", "vote"):
        result = _run([_whole() for _ in range(4)], MergeConfig(min_traced=3, patch_ids=patch_ids))
        lut = result.patch_to_global[0]
        assert len(set(lut[1:].tolist())) == 3
        labels = result.gaussian_labels
        for k, obj in enumerate((A, B, C)):
            assert torch.all(labels[list(obj)] == lut[k + 1])


def test_refine_maps_splits_impure_patches_and_fills_unmasked_pixels():
    # Three pixels: pixel 0 in patch 1 (pure), pixels 1 and 2 in patch 2 (impure), pixel 3 in patch 0.
    from trace3d_ns.git.merging import ConsistentInstances, MergeStats, refine_maps

    stats = MergeStats(0, 0, 0, 0, 0, 0)
    labels = torch.tensor([5, 6, 7, 8])  # Gaussian g is drawn alone at pixel g
    result = ConsistentInstances(
        maps=[torch.tensor([[1, 2, 2, 0]], dtype=torch.int32)],
        patch_to_global=[torch.tensor([0, 1, 2])],
        patch_purity=[torch.tensor([0.0, 1.0, 0.5])],
        gaussian_labels=labels, gaussian_confidence=torch.ones(4), stats=stats,
    )
    contrib = Contributions(torch.arange(4), torch.arange(4), torch.ones(4), 4, 1)
    patch_map = torch.tensor([[1, 2, 2, 0]], dtype=torch.int32)
    assert refine_maps(result, [patch_map], lambda v: contrib)[0].tolist() == [[1, 6, 7, 8]]
    assert refine_maps(result, [patch_map], lambda v: contrib, fill_unmasked=False)[0].tolist() == [[1, 6, 7, 0]]
    assert refine_maps(result, [patch_map], lambda v: contrib, min_purity=0.5)[0].tolist() == [[1, 2, 2, 8]]


def test_segments_merged_by_sam_in_several_views_do_not_chain_two_objects():
    # Views 0, 1: SAM merged B and C into one mask (their segments share all 40 Gaussians, more than
    # any other pair). View 3 sees B whole and only 4 Gaussians of C (C occluded), view 4 the reverse;
    # views 2, 5, 6 see parts of B and C (12-16 each) apart. A merged segment maps 20 of its 24 Gaussians
    # seen in view 3 onto B there and 20 of 24 onto C in view 4: mutual-majority links to both. Linked
    # with the most shared Gaussians first, those links chained B and C into one instance; strongest
    # first, B's and C's own segments (which map onto each other wholly) form two instances first.
    b, c = list(B), list(C)
    views = [
        [list(A), b + c],
        [list(A), b + c],
        [list(A), b[:12], c[:12]],
        [list(A), b, c[:4]],
        [list(A), b[:4], c],
        [list(A), b[8:], c[8:]],
        [list(A), b[4:16], c[4:]],
    ]
    result = _run(views)
    ids = _three_distinct_instances(result)
    for v in range(2, 7):  # the views that keep B and C apart
        assert result.patch_to_global[v][1:].tolist() == ids
    # The merged segments take one of the two ids and are marked impure.
    for v in (0, 1):
        assert int(result.patch_to_global[v][2]) in ids[1:] and float(result.patch_purity[v][2]) < 0.9


def test_segment_whose_gaussians_carry_other_labels_loses_its_links():
    # X = A (20 Gaussians), Y = B and C (40). Views 1-3: SAM merged X and Y into one mask. View 0 sees X
    # whole and only 8 of Y: the merged segment maps 20 of its 28 Gaussians seen there onto X, a
    # mutual-majority link, so it joins X's instance (and the merged segments of views 1-3 with it).
    # Y's last 6 Gaussians are seen apart from X in two views only (4, 5): three votes for X's id
    # against two for Y's. After the vote the merged segments' Gaussians mostly carry Y's id (purity
    # 26/60 < 0.5): they lose their cross-view links and the second vote labels all of Y as Y.
    x, y = list(A), list(B) + list(C)
    views = [[x, y[:8]], [x + y], [x + y], [x + y], [x, y], [x, y], [x, y[:34]], [x, y[:34]], [x, y[:34]]]
    # (contrary weight 0.5: at the default 1 the two views against X's id already outweigh it, below)
    half = MergeConfig(min_traced=3, contrary_weight=0.5)
    before = _run(views, replace(half, unlink_rounds=0, purity_weighted_vote=False))
    x_id, y_id = int(before.gaussian_labels[0]), int(before.gaussian_labels[20])
    assert x_id != y_id and torch.all(before.gaussian_labels[y[34:]] == x_id)  # the failure this rule fixes
    result = _run(views, replace(half, unlink_rounds=1))
    labels = result.gaussian_labels
    x_id, y_id = int(labels[0]), int(labels[20])
    assert x_id != y_id and 0 not in (x_id, y_id)
    assert torch.all(labels[x] == x_id) and torch.all(labels[y] == y_id)
    assert torch.equal(_run(views, replace(half, unlink_rounds=2)).gaussian_labels, labels)  # converged
    defaults = _run(views, MergeConfig(min_traced=3))  # contrary weight 1, no unlinking
    assert MergeConfig().unlink_rounds == 0 and torch.equal(defaults.gaussian_labels, labels)
    for v in (0, 4, 5, 6, 7, 8):
        assert result.patch_to_global[v][1:].tolist() == [x_id, y_id]
    for v in (1, 2, 3):  # the merged patches take Y's id (most of their Gaussians) and are marked impure
        assert int(result.patch_to_global[v][1]) == y_id and float(result.patch_purity[v][1]) < 0.9


def test_patch_votes_are_weighted_by_purity():
    # X = A, Y = B (20 Gaussians each). As above, SAM merged them in views 1-3 and the merged segments
    # join X's instance through view 0 (which sees 8 of Y). Y's last 2 Gaussians are seen apart in two
    # views only (4, 5): three votes for X's id against two for Y's. The merged segments' purity is
    # 22/40 >= 0.5, so they keep their links; weighted by purity the three votes weigh 3 * 0.55 = 1.65
    # and Y's two (its patches hold 18 of 20 Gaussians labelled Y) 2 * 0.9 = 1.8. (Contrary weight 0.5:
    # at 1, the two views that keep the two apart already outweigh the three.)
    x, y = list(A), list(B)
    views = [[x, y[:8]], [x + y], [x + y], [x + y], [x, y], [x, y], [x, y[:18]], [x, y[:18]], [x, y[:18]]]
    half = MergeConfig(min_traced=3, contrary_weight=0.5)
    before = _run(views, replace(half, purity_weighted_vote=False))
    x_id = int(before.gaussian_labels[0])
    assert torch.all(before.gaussian_labels[y[18:]] == x_id) and float(before.patch_purity[1][1]) > 0.5
    result = _run(views, half)
    labels = result.gaussian_labels
    x_id, y_id = int(labels[0]), int(labels[20])
    assert x_id != y_id and 0 not in (x_id, y_id)
    assert torch.all(labels[x] == x_id) and torch.all(labels[y] == y_id)
    for v in (0, 4, 5, 6, 7, 8):
        assert result.patch_to_global[v][1:].tolist() == [x_id, y_id]
    for v in (1, 2, 3):  # half of the merged patches' Gaussians carry either id
        assert float(result.patch_purity[v][1]) == 0.5


def test_patch_purity_weighs_gaussians_by_what_they_draw():
    # In view 0, 10 Gaussians of B lie behind A and show through it faintly (weight 0.1 each) in A's
    # patch; views 1-4 see A and B apart. A's patch has 30 traced Gaussians, 10 of them B's, but B
    # draws only 1 of its 21 units of weight: purity 20/21, so refine_maps keeps the patch's id.
    x, y = list(A), list(B)
    acc = TraceAccumulator(N, 5)
    gids = torch.tensor(x + y[:10])
    contrib = Contributions(gids, torch.ones(30, dtype=torch.long), torch.tensor([1.0] * 20 + [0.1] * 10), 2, 1)
    maps = [torch.tensor([[0, 1]], dtype=torch.int32)]
    acc.add_view(0, contrib, maps[0])
    for v in range(1, 5):
        contrib, patch_map = _view([x, y])
        acc.add_view(v, contrib, patch_map)
        maps.append(patch_map)
    result = consistent_instances(acc.build(), maps, MergeConfig(min_traced=3))
    labels = result.gaussian_labels
    assert torch.all(labels[x] == labels[0]) and torch.all(labels[y] == labels[20]) and labels[0] != labels[20]
    assert int(result.patch_to_global[0][1]) == int(labels[0])
    assert abs(float(result.patch_purity[0][1]) - 20 / 21) < 1e-3


def test_gaussians_vote_with_the_weight_they_draw():
    # B's first 10 Gaussians lie behind A in views 0-2 and show through A's patch faintly (weight 0.1);
    # views 3, 4 see A and B apart, views 5-7 A and B's other 10. Voting with probabilities, those 10
    # get three votes for A's id and two for B's; voting with the weight they draw, 0.3 against 2.
    # (Contrary weight 0.5: at 1, the two views that keep A and B apart outweigh the three already.)
    x, y = list(A), list(B)
    acc = TraceAccumulator(N, 8)
    maps = []
    for v in range(8):
        if v < 3:
            gids = torch.tensor(x + y[:10])
            contrib = Contributions(gids, torch.ones(30, dtype=torch.long), torch.tensor([1.0] * 20 + [0.1] * 10), 2, 1)
            patch_map = torch.tensor([[0, 1]], dtype=torch.int32)
        else:
            contrib, patch_map = _view([x, y] if v < 5 else [x, y[10:]])
        acc.add_view(v, contrib, patch_map)
        maps.append(patch_map)
    traces = acc.build()
    half = MergeConfig(min_traced=3, contrary_weight=0.5)
    before = consistent_instances(traces, maps, replace(half, vote="probability")).gaussian_labels
    assert torch.all(before[y[:10]] == before[0]) and before[0] != before[30]
    labels = consistent_instances(traces, maps, half).gaussian_labels
    assert torch.all(labels[x] == labels[0]) and torch.all(labels[y] == labels[20]) and labels[0] != labels[20]


def test_gaussians_drawn_mostly_where_no_mask_is_stay_background():
    # C is in no mask (patch 0) in views 0-2 and under A's mask, which spilled onto it, in view 3; A
    # itself is left unmasked in view 0. Patch 0 holds 3/4 of C's votes and 1/4 of A's: C is labelled
    # 0, A keeps its id. With unmasked_min_share > 1 (id 0 only for Gaussians no view masks), C takes
    # the id of the spilled mask (its own instance here: that patch is half C, so it does not link to A's).
    acc = TraceAccumulator(N, 4)
    maps = []
    for v in range(4):
        if v < 3:
            contrib, patch_map = _view(_whole())
            patch_map = torch.tensor([[0, 0 if v == 0 else 1, 2, 0]], dtype=torch.int32)
        else:
            contrib, patch_map = _view([list(A) + list(C), list(B)])
        acc.add_view(v, contrib, patch_map)
        maps.append(patch_map)
    traces = acc.build()
    labels = consistent_instances(traces, maps, MergeConfig(min_traced=3)).gaussian_labels
    assert torch.all(labels[list(C)] == 0)
    assert torch.all(labels[list(A)] == labels[0]) and labels[0] > 0 and labels[20] > 0 and labels[0] != labels[20]
    fallback = consistent_instances(traces, maps, MergeConfig(min_traced=3, unmasked_min_share=2.0)).gaussian_labels
    assert torch.all(fallback[list(C)] == fallback[40]) and fallback[40] > 0


def test_no_link_candidate_is_no_link():
    # A+B is one patch in view 0 and two in view 1: each part maps wholly onto A+B, but A+B only half
    # onto either, so no pair is a mutual majority. Nothing links, and nothing fails for lack of links.
    result = _run([[list(A) + list(B)], [list(A), list(B)]])
    assert result.stats.cross_view_links == 0
    labels = result.gaussian_labels
    assert labels[0] > 0 and labels[20] > 0


def test_each_segment_of_a_view_keeps_a_region_of_its_own():
    from trace3d_ns.git.merging import _separate_segments

    # View 0: patches 1, 2, 3 (2 and 3 one segment); view 1: patches 5, 6 (one segment); 0, 4 = patch 0.
    segment = np.array([0, 1, 2, 2, 4, 5, 5])
    votes = np.array([0, 7, 7, 8, 0, 7, 9])  # patch 1 votes for the id the heavier segment {2, 3} holds
    traced = np.array([0, 5, 10, 2, 0, 4, 1])
    view = np.array([0, 0, 0, 0, 1, 1, 1])
    real = np.array([False, True, True, True, False, True, True])
    ids = _separate_segments(votes, segment, traced, view, real, max_label=11)
    assert ids.tolist() == [0, 12, 7, 7, 0, 7, 7]


def test_segments_partition_every_view_and_ids_do_not():
    # B (10 Gaussians) lies between A and C (25 each). Views 1 and 2 join it with A, views 3 and 4 with
    # C; view 0 sees all three apart. The joined patches map most of their Gaussians onto A (or C)
    # and join that instance; B's own patch links nowhere, so B's Gaussians are labelled A (tie with
    # C, the smaller id). With ids, view 0 then paints B as A; with segments B keeps a region (and an
    # id) of its own there, which refinement does not split.
    a, b, c = list(range(25)), list(range(25, 35)), list(range(35, 60))
    views = [[a, b, c], [a + b, c], [a + b, c], [a, b + c], [a, b + c]]
    # votes for only: with contrary votes B's own view outweighs the joins and B keeps an id of its own
    by_ids = _run(views, MergeConfig(min_traced=3, view_partition="ids", contrary_weight=0.0))
    ours = _run(views, MergeConfig(min_traced=3, view_partition="segments", contrary_weight=0.0))
    contrary = _run(views).gaussian_labels
    assert int(contrary[30]) not in (int(contrary[0]), int(contrary[40]), 0)
    assert torch.equal(by_ids.gaussian_labels, ours.gaussian_labels)  # the same labels either way
    assert int(ours.gaussian_labels[30]) == int(ours.gaussian_labels[0])  # B carries A's id
    assert by_ids.patch_to_global[0].tolist() == [0, 1, 1, 2]  # B painted as A in view 0
    lut = ours.patch_to_global[0].tolist()
    assert lut[1] == 1 and lut[3] == 2 and lut[2] not in (0, 1, 2) and ours.stats.view_only_ids == 1
    assert float(ours.patch_purity[0][2]) == 1.0 and ours.stats.num_instances == 2
    for v in range(1, 5):
        assert torch.equal(ours.patch_to_global[v], by_ids.patch_to_global[v])


def test_views_that_keep_a_gaussian_apart_from_an_instance_vote_against_it():
    # X = A (20 Gaussians), Y = B[:12]. Views 0-2: SAM merged them (weight 1 each); the merged segments
    # map 20 of their 32 Gaussians onto X's segments and join X's instance. Views 3-7 see Y apart from
    # X, but faintly (Y draws weight 0.5 there): 2.5 votes for Y's id against 3 for X's, and within-view
    # merging keeps them apart (3 of 7 other views join them). With contrary votes at weight 0.5, the
    # five views where X is present and Y drawn in its own segment count against X: 3 - 0.5 * 2.5 < 2.5.
    x, y = list(A), list(B)[:12]
    acc, maps = TraceAccumulator(N, 8), []
    for v in range(8):
        if v < 3:
            contrib, patch_map = _view([x + y])
        else:
            contrib, patch_map = _view([x, y])
            contrib.weights[len(x):] = 0.5
        acc.add_view(v, contrib, patch_map)
        maps.append(patch_map)
    traces = acc.build()
    before = consistent_instances(traces, maps, MergeConfig(min_traced=3, contrary_weight=0.0)).gaussian_labels
    assert torch.all(before[y] == before[0])  # the failure contrary votes fix
    result = consistent_instances(traces, maps, MergeConfig(min_traced=3, contrary_weight=0.5))
    labels = result.gaussian_labels
    assert torch.all(labels[x] == labels[0]) and torch.all(labels[y] == labels[20])
    assert 0 not in (int(labels[0]), int(labels[20])) and labels[0] != labels[20]
    for v in range(3, 8):
        assert result.patch_to_global[v][1:].tolist() == [int(labels[0]), int(labels[20])]


def test_contrary_votes_count_only_views_where_the_instance_is_present():
    from trace3d_ns.git.merging import _TraceArrays, _contrary_votes

    # View 0: A and B apart; view 1: A only; view 2: B only. Under ids A -> 1, B -> 2, a Gaussian of A
    # votes 1 in views 0 and 1; id 2 is present in views 0 and 2, and in view 0 the Gaussian votes 1
    # for another instance (A's id): 1 vote against 2. Against its own id 1 (present in views 0, 1): 0.
    acc, maps = TraceAccumulator(N, 3), []
    for v, groups in enumerate([[list(A), list(B)], [list(A)], [list(B)]]):
        contrib, patch_map = _view(groups)
        acc.add_view(v, contrib, patch_map)
        maps.append(patch_map)
    config = MergeConfig(min_traced=3)
    t = _TraceArrays(acc.build(), config)
    global_id = np.array([0, 1, 2, 0, 1, 0, 2])  # per global patch: view 0 (0, A, B), view 1 (0, A), view 2 (0, B)
    keep = t.seen[t.entry_obs]
    ids = global_id[t.entry_patch[keep]]
    owner = np.array([0, 0, 20, 20])
    label = np.array([1, 2, 1, 2])
    votes = np.array([2.0, 0.0, 0.0, 2.0])
    against = _contrary_votes(t, global_id, owner, label, votes, t.entry_obs[keep], ids, t.entry_prob[keep])
    assert against.tolist() == [0.0, 1.0, 1.0, 0.0]
    blocks = _contrary_votes(t, global_id, owner, label, votes, t.entry_obs[keep], ids, t.entry_prob[keep], block=16)
    assert blocks.tolist() == against.tolist()  # Gaussians 0 and 20 in different row blocks


def test_faint_gaussians_behind_a_thin_object_do_not_break_its_links():
    # A rod R (10 Gaussians) in front of a box (40). In each of three views the rod's patch is also
    # traced to by 12 of the box's Gaussians, seen faintly through the rod's edges (weight 0.1), a
    # different 12 in each view; the other 28 fill the box's patch. Counted 1 each, the rod's patch is
    # 12/22 box: it maps less than half of itself onto the rod's patch of another view, so the rod's
    # patches link to nothing. Counted by their weight (capped at 1), the faint ones weigh 1.2 of 11.2;
    # the rod's patches also take the rod's id, not the one most of their traced Gaussians (12 of 22) carry.
    rod, box = list(range(10)), list(range(20, 60))
    acc = TraceAccumulator(60, 3)
    maps = []
    for v in range(3):
        faint = box[12 * v : 12 * v + 12]
        rest = [g for g in box if g not in faint]
        gids = torch.tensor(rod + faint + rest)
        pixels = torch.tensor([1] * 22 + [2] * 28)
        weights = torch.tensor([1.0] * 10 + [0.1] * 12 + [1.0] * 28)
        acc.add_view(v, Contributions(gids, pixels, weights, 3, 1), torch.arange(3, dtype=torch.int32)[None])
        maps.append(torch.arange(3, dtype=torch.int32)[None])
    traces = acc.build()
    result = consistent_instances(traces, maps, MergeConfig(min_traced=3))
    labels = result.gaussian_labels
    rod_id, box_id = int(labels[0]), int(labels[20])
    assert 0 not in (rod_id, box_id) and rod_id != box_id
    assert torch.all(labels[rod] == rod_id) and torch.all(labels[box] == box_id)
    for v in range(3):
        assert result.patch_to_global[v][1:].tolist() == [rod_id, box_id]
    # Counted 1 each, the rod's patch also looks half box from the other views: merged into the box.
    counted = consistent_instances(traces, maps, MergeConfig(min_traced=3, count_weight_cap=0.0)).gaussian_labels
    assert torch.all(counted[rod] == counted[20])


def test_negative_count_weight_cap_is_refused():
    contrib, patch_map = _view(_whole())
    acc = TraceAccumulator(N, 1)
    acc.add_view(0, contrib, patch_map)
    with pytest.raises(ValueError, match="count_weight_cap"):
        consistent_instances(acc.build(), [patch_map], MergeConfig(count_weight_cap=-1.0))


def test_parts_that_one_mask_covers_in_other_views_merge_when_asked():
    # Every view splits A in two patches (its parts), which a mask of the whole covers together:
    # the patch ids alone never show the parts as one, the masks do.
    halves = [list(A)[:10], list(A)[10:], list(B), list(C)]
    views = [halves for _ in range(6)]
    alike = []
    for _ in views:
        a = np.eye(5, dtype=np.uint8)
        a[0, 0] = 0
        a[1, 2] = a[2, 1] = 1  # the whole of A over its two parts
        alike.append(a)
    plain = _run(views, MergeConfig(min_traced=3), alike)  # alike_by_masks off: ids only
    lut = plain.patch_to_global[0]
    assert lut[1] != lut[2]
    merged = _run(views, MergeConfig(min_traced=3, alike_by_masks=True), alike)
    for v in range(6):
        lut = merged.patch_to_global[v]
        assert lut[1] == lut[2] != 0  # A's parts are one instance
        assert len({int(lut[1]), int(lut[3]), int(lut[4])}) == 3  # A, B, C stay apart
    assert merged.stats.num_instances == 3
    identity = [None] * 6  # no matrices (e.g. an old cache): patch ids, as without the option
    assert torch.equal(_run(views, MergeConfig(min_traced=3, alike_by_masks=True), identity).gaussian_labels,
                       plain.gaussian_labels)
    with pytest.raises(ValueError, match="alike matrices"):
        _run(views, MergeConfig(min_traced=3, alike_by_masks=True), alike[:5])
