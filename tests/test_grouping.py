"""3D grouping of Gaussians by their traced patches: objects the masks join in a minority of views
stay apart, objects the masks cut into parts in a minority of views stay whole."""

import numpy as np
import scipy.sparse as sp

from trace3d_ns.git.grouping import GroupingConfig, average_linkage, group_gaussians, neighbour_pairs


def _observations(assign: np.ndarray):
    """top_patch [N, P], informative [N, L], patch_view [P] from assign [N, L] (-1: not informative;
    else the patch index local to the view, >= 1)."""
    n, views = assign.shape
    per_view = assign.max(axis=0) + 1  # [L] patches of each view (0 included)
    base = np.concatenate([[0], np.cumsum(per_view)])
    g, v = np.nonzero(assign >= 0)
    top = sp.csr_matrix((np.ones(len(g)), (g, base[v] + assign[g, v])), shape=(n, int(base[-1])))
    informative = sp.csr_matrix((np.ones(len(g)), (g, v)), shape=(n, views))
    patch_view = np.repeat(np.arange(views), per_view)
    return top, informative, patch_view


def _two_touching_objects(num_views=12, joined=4, split=4, seed=0):
    """Two 20x10 point grids side by side (touching), object 0 cut into halves in `split` views, the
    two joined into one patch in `joined` other views."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(20), np.arange(10))
    grid = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)], 1).astype(float)
    means = np.concatenate([grid, grid + [20.0, 0, 0]])  # object 0: x < 20, object 1: x >= 20
    truth = np.repeat([1, 2], len(grid))
    assign = np.zeros((len(means), num_views), dtype=np.int64)
    for v in range(num_views):
        if v < joined:
            assign[:, v] = 1
        elif v < joined + split:
            assign[:, v] = np.where(truth == 2, 3, np.where(means[:, 0] < 10, 1, 2))
        else:
            assign[:, v] = truth
    hidden = rng.random(assign.shape) < 0.1  # some Gaussians not informative in some views
    assign[hidden] = -1
    return means, truth, assign


def test_joined_in_a_minority_of_views_stay_apart_and_parts_stay_whole():
    means, truth, assign = _two_touching_objects()
    labels = group_gaussians(*_observations(assign), means, GroupingConfig())
    assert set(np.unique(labels)) == {1, 2}
    for obj in (1, 2):
        assert len(np.unique(labels[truth == obj])) == 1
    assert labels[truth == 1][0] != labels[truth == 2][0]


def test_joined_in_most_views_is_one_instance():
    means, truth, assign = _two_touching_objects(joined=8, split=0)
    labels = group_gaussians(*_observations(assign), means, GroupingConfig())
    assert len(np.unique(labels)) == 1


def test_gaussians_informative_nowhere_get_no_label():
    means, truth, assign = _two_touching_objects()
    assign[:5] = -1
    labels = group_gaussians(*_observations(assign), means, GroupingConfig())
    assert (labels[:5] == 0).all() and (labels[5:] > 0).all()


def _counts(patches: np.ndarray, per_view: int = 4):
    """counts [nodes, P] with one Gaussian per node in local patch patches[node, view]."""
    nodes, views = patches.shape
    rows = np.repeat(np.arange(nodes), views)
    cols = (np.arange(views) * per_view + patches).ravel()
    return sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(nodes, views * per_view)), np.repeat(np.arange(views), per_view)


def test_average_linkage_does_not_chain_through_a_bridge():
    # A-B agree in 4 of 6 views, B-C in 4 of 6, A-C in 2. A and B merge first (ties: smaller id); the
    # group {A, B} then meets C at (0 + 0 + 1 + 1 + 0.5 + 0.5) / 6 = 0.5, not above the threshold: C
    # stays apart, where linking single pairs would chain all three.
    patches = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 2, 2], [3, 3, 1, 1, 2, 2]])
    counts, patch_view = _counts(patches)
    edges = np.array([[0, 1], [1, 2]])
    group = average_linkage(counts, np.ones((3, 6)), patch_view, edges, 0.5, 2)
    assert group[0] == group[1] != group[2]
    # with C agreeing with B in one more view, the group's average passes and all three merge
    patches[2, 1] = 1
    counts, patch_view = _counts(patches)
    group = average_linkage(counts, np.ones((3, 6)), patch_view, edges, 0.5, 2)
    assert group[0] == group[1] == group[2]


def test_average_linkage_needs_min_views_in_common():
    patches = np.array([[1, 1, 1], [1, 1, 1]])
    counts, patch_view = _counts(patches)
    views = np.array([[1, 1, 0], [0, 1, 1]], dtype=float)  # one view in common
    counts = counts.multiply(np.repeat(views, 4, axis=1)).tocsr()
    assert len(set(average_linkage(counts, views, patch_view, np.array([[0], [1]]), 0.5, 2))) == 2
    assert len(set(average_linkage(counts, views, patch_view, np.array([[0], [1]]), 0.5, 1))) == 1


def test_neighbour_pairs_are_unique_and_ordered():
    means = np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [10, 0, 0]])
    pairs = neighbour_pairs(means, 1)
    assert pairs.shape[0] == 2 and (pairs[0] < pairs[1]).all()
    assert {tuple(p) for p in pairs.T} >= {(0, 1), (2, 3)}
    assert neighbour_pairs(means[:1], 4).shape == (2, 0)
    means[1] = np.nan  # e.g. a diverged Gaussian: no neighbours, the others still pair up
    pairs = neighbour_pairs(means, 1)
    assert 1 not in pairs and {tuple(p) for p in pairs.T} >= {(0, 2), (2, 3)}


def test_average_linkage_refuses_counts_in_views_without_gaussians():
    import pytest

    counts, patch_view = _counts(np.array([[1, 1], [1, 1]]))
    with pytest.raises(ValueError, match="views says the node has none"):
        average_linkage(counts, np.array([[1.0, 0.0], [1.0, 1.0]]), patch_view, np.array([[0], [1]]), 0.5, 1)
