"""Gaussian instance tracing: exact scatter-add against a dense brute force, sparse store edits."""

from __future__ import annotations

import pytest
import torch

from trace3d_ns.git.surface_gaussians import SurfaceGaussiansConfig, surface_scene
from trace3d_ns.git.tracing import PROB_SCALE, InstanceTraces, TraceAccumulator, TraceConfig, trace_view
from trace3d_ns.rendering import Contributions, contributions
from trace3d_ns.scene.generate import SceneSpec

QUANT = 1.0 / PROB_SCALE  # uint8 probability step


@pytest.fixture(scope="module")
def scene():
    return surface_scene(SceneSpec(num_objects=3, num_views=4, image_size=32, seed=5))


@pytest.fixture(scope="module")
def traced(scene):
    """Contributions and patch maps (instances cut by a 2x2 grid) of every view."""
    views = []
    for v in range(4):
        c = contributions(
            scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats[v], scene.Ks[v], 32, 32
        )
        cell = (torch.arange(32)[:, None] // 16) * 2 + torch.arange(32)[None, :] // 16  # [H, W]
        patch = torch.unique(scene.gt_instances[v] * 4 + cell, return_inverse=True)[1].int()
        views.append((v, c, patch))
    return views


def dense_trace(c: Contributions, patch: torch.Tensor, n: int, count: bool = False) -> torch.Tensor:
    """Obviously correct [N, T] weights: accumulate every pair into a dense matrix."""
    labels = patch.reshape(-1).long()[c.pixel_ids]
    out = torch.zeros(n, int(patch.max()) + 1, dtype=torch.float64)
    w = torch.ones_like(c.weights) if count else c.weights
    out.index_put_((c.gaussian_ids, labels), w.double(), accumulate=True)
    return out


@pytest.mark.parametrize("dense_limit", [1 << 25, 0], ids=["dense-buffer", "sorted-keys"])
@pytest.mark.parametrize("mode", ["weight", "count"])
def test_trace_matches_dense_brute_force(scene, traced, mode, dense_limit):
    n = scene.num_gaussians
    config = TraceConfig(mode=mode, topk=64, min_prob=0.0, min_weight=0.0, dense_limit=dense_limit)
    store = InstanceTraces.from_views(traced, n, 4, config)
    for v, c, patch in traced:
        dense = dense_trace(c, patch, n, count=mode == "count")  # [N, T]
        total = dense.sum(dim=1)
        prob = torch.where(total[:, None] > 0, dense / total[:, None].clamp(min=1e-30), 0.0)
        assert torch.allclose(store.view_dense(v).double(), prob, atol=QUANT)
        assert torch.allclose(store.weights(v).double(), total, rtol=2.0**-8, atol=1e-6)  # bfloat16 rounding
        assert torch.equal(store.visible(v), total > 0)
        top, top_prob = store.view_top(v)
        seen = total > 0
        assert torch.all(top_prob[seen] >= prob[seen].max(dim=1).values - QUANT)
        assert torch.all(prob[seen, top[seen]] >= prob[seen].max(dim=1).values - 2 * QUANT)
    if mode == "count":  # pixel counts are integers
        v, c, patch = traced[0]
        assert torch.equal(store.weights(v), dense_trace(c, patch, n, count=True).sum(dim=1).float())


def test_store_is_sorted_csr_and_small(scene, traced):
    store = InstanceTraces.from_views(traced, scene.num_gaussians, 4)
    gaussian = store.obs_gaussian()
    key = gaussian * 4 + store.obs_view.long()
    assert torch.all(key[1:] > key[:-1])  # sorted by (Gaussian, view), unique
    assert int(store.offsets[-1]) == store.num_observations
    assert store.obs_view.dtype == torch.uint8 and store.obs_prob.dtype == torch.uint8
    assert torch.all(store.extra_obs[1:] >= store.extra_obs[:-1])
    # Memory follows observations: 1 + 2 + 1 + 1 bytes each, 6 per extra entry, 8 per Gaussian offset.
    o, x, n = store.num_observations, store.extra_obs.numel(), scene.num_gaussians
    assert store.nbytes() == 5 * o + 6 * x + 8 * (n + 1) + 8 * 4
    assert o <= 4 * n and x <= o


def test_topk_truncation_keeps_mass_bookkeeping():
    # Gaussian 0: weights 5, 3, 1, 1 on patches 1..4; Gaussian 1: all on patch 2; Gaussian 2: 0.001 only.
    gids = torch.tensor([0] * 10 + [1, 1, 2])
    labels = torch.tensor([1] * 5 + [2] * 3 + [3, 4] + [2, 2, 1])
    weights = torch.tensor([1.0] * 10 + [0.5, 0.5, 0.001])
    t = trace_view(gids, labels, weights, 5, TraceConfig(topk=2, min_prob=0.0, min_weight=0.01))
    assert _by_gaussian(t) == {0: [(1, 0.5), (2, 0.3)], 1: [(2, 1.0)]}  # Gaussian 2 is below min_weight
    contrib = Contributions(gids, torch.zeros_like(gids), weights, 1, 1)  # pixel ids are unused below
    acc = TraceAccumulator(3, 1, TraceConfig(topk=2, min_prob=0.0, min_weight=0.01))
    acc.add_trace(0, t, 5)
    store = acc.build()
    assert torch.allclose(store.residual_mass(), torch.tensor([0.2, 0.0]), atol=QUANT)
    assert torch.allclose(store.max_prob(), torch.tensor([0.5, 1.0]), atol=QUANT)
    assert store.argmax().tolist() == [1, 2]
    assert len(contrib) == 13

    dropped = trace_view(gids, labels, weights, 5, TraceConfig(topk=4, min_prob=0.15, min_weight=0.0))
    assert _by_gaussian(dropped) == {0: [(1, 0.5), (2, 0.3)], 1: [(2, 1.0)], 2: [(1, 1.0)]}  # 0.1, 0.1 dropped


def _by_gaussian(t) -> dict:
    """{Gaussian: [(patch, prob rounded), ...]} of a ViewTrace."""
    out, start = {}, 0
    for g, c in zip(t.gaussian.tolist(), t.count.tolist()):
        patches, probs = t.patch[start : start + c].tolist(), t.prob[start : start + c].tolist()
        out[g] = [(p, round(q, 4)) for p, q in zip(patches, probs)]
        start += c
    return out


def test_index_select_split_and_prune(scene, traced):
    store = InstanceTraces.from_views(traced, scene.num_gaussians, 4)
    n = scene.num_gaussians
    # Split: Gaussians 0 and 7 are replaced by two children each, appended at the end (gsplat order).
    keep = torch.ones(n, dtype=torch.bool)
    keep[[0, 7]] = False
    index = torch.cat([torch.nonzero(keep).squeeze(1), torch.tensor([0, 0, 7, 7])])
    split = store.index_select(index)
    assert split.num_gaussians == n + 2
    for v in range(4):
        before = store.view_dense(v)
        after = split.view_dense(v)
        assert torch.equal(after, before[index])
        assert torch.equal(split.weights(v), store.weights(v)[index])
    # Prune with a mask: rows of pruned Gaussians disappear.
    mask = torch.rand(n, generator=torch.Generator().manual_seed(0)) > 0.3
    pruned = store.index_select(mask)
    assert pruned.num_gaussians == int(mask.sum())
    assert torch.equal(pruned.view_dense(2), store.view_dense(2)[mask])
    assert pruned.num_observations == int((store.offsets[1:] - store.offsets[:-1])[mask].sum())


def test_remap_patches_sums_merged_probabilities(scene, traced):
    store = InstanceTraces.from_views(traced, scene.num_gaussians, 4, TraceConfig(topk=8, min_prob=0.0))
    luts = []
    for v in range(4):
        t = int(store.num_patches[v])
        lut = torch.arange(t)
        lut[lut >= 2] = 1  # merge every patch >= 1 into patch 1
        luts.append(lut)
    merged = store.remap_patches(luts)
    for v in range(4):
        before = store.view_dense(v)
        after = merged.view_dense(v)
        assert after.shape[1] == 2
        assert torch.allclose(after[:, 1], before[:, 1:].sum(dim=1), atol=8 * QUANT)
        assert torch.allclose(after[:, 0], before[:, 0], atol=QUANT)
    assert merged.num_entries <= store.num_entries


def test_majority_labels_sum_weight_over_views(scene):
    """Traced ground-truth maps (the same id in every view): each Gaussian's majority id is the one
    with the most weight summed over the views, -1 where no view sees it."""
    views, n = [], scene.num_gaussians
    exact = torch.zeros(n, int(scene.gt_instances.max()) + 1, dtype=torch.float64)
    for v in range(4):
        c = contributions(scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats[v], scene.Ks[v], 32, 32)
        gt = scene.gt_instances[v].int()
        views.append((v, c, gt))
        exact[:, : int(gt.max()) + 1] += dense_trace(c, gt, n)
    store = InstanceTraces.from_views(views, n, 4, TraceConfig(topk=64, min_prob=0.0, min_weight=0.0))
    labels = store.majority_labels()
    seen = exact.sum(dim=1) > 0
    assert torch.equal(labels < 0, ~seen)
    top2 = exact.topk(2, dim=1).values
    clear = seen & (top2[:, 0] > 1.1 * top2[:, 1])  # away from ties that bfloat16 weights may flip
    assert clear.sum() > 0.5 * seen.sum() and (exact.argmax(dim=1) != 0).any()
    assert torch.equal(labels[clear], exact.argmax(dim=1)[clear])


def test_trace_rejects_mismatched_patch_map(scene, traced):
    _, c, patch = traced[0]
    with pytest.raises(ValueError):
        TraceAccumulator(scene.num_gaussians, 4).add_view(0, c, patch[:16])


def test_surface_fixture_reproduces_gt_instances():
    from trace3d_ns.git.surface_gaussians import render_instance_ids

    spec = SceneSpec(num_objects=4, num_views=3, image_size=48, seed=2)
    fixture = surface_scene(spec, SurfaceGaussiansConfig())
    for v in range(3):
        agreement = (render_instance_ids(fixture, v) == fixture.gt_instances[v]).float().mean()
        assert agreement >= 0.9
    # gt_instances equals what the generator writes (same centre rays).
    from trace3d_ns.scene.generate import layout_scene, make_cameras, render_view

    cams = make_cameras(spec)
    view = render_view(layout_scene(spec, cams), cams, 1, supersample=1)
    assert torch.equal(fixture.gt_instances[1], torch.from_numpy(view.instances.astype("int64")))
    assert set(fixture.instance_ids.unique().tolist()) == {0, 1, 2, 3, 4}


class _FakeModel:
    """The two methods of Trace3DModel that trace_model uses, rendering at half resolution."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.device = torch.device("cpu")
        self.config = type("Config", (), {"rasterize_mode": "classic", "rasterizer": "auto"})()

    def activated_gaussians(self):
        s = self.scene
        return {"means": s.means, "quats": s.quats, "scales": s.scales, "opacities": s.opacities}

    def camera_matrices(self, view: list[int], **kwargs):
        s, v = self.scene, view[0]
        half = torch.diag(torch.tensor([0.5, 0.5, 1.0]))
        return s.viewmats[v][None], (half @ s.Ks[v])[None], s.width // 2, s.height // 2


def test_trace_model_renders_at_patch_map_resolution(scene, traced):
    from trace3d_ns.git.tracing import trace_model

    patch_maps = [patch for _, _, patch in traced]
    store = trace_model(_FakeModel(scene), list(range(4)), patch_maps, progress=False)
    direct = InstanceTraces.from_views(traced, scene.num_gaussians, 4)
    for v in range(4):
        assert torch.allclose(store.view_dense(v), direct.view_dense(v))
        assert torch.equal(store.weights(v), direct.weights(v))
