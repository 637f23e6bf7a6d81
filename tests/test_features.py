"""The feature field: contrastive loss, rendered features and their gradients, stable PCA."""

import pytest
import torch

from tests.test_method import _camera, _model

from trace3d_ns.features.contrastive import contrastive_loss, contrastive_loss_reference, sample_labelled_pixels
from trace3d_ns.features.palette import colorize_ids, instance_palette
from trace3d_ns.features.pca import FeaturePCA


def test_loss_prefers_features_that_match_the_instance_map():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(1, 5, (400,), generator=g)
    centres = torch.randn(5, 16, generator=g) * 0.3
    matching = centres[labels] + 0.01 * torch.randn(400, 16, generator=g)
    shuffled = matching[torch.randperm(400, generator=g)]
    good, bad = contrastive_loss(matching, labels, 100.0), contrastive_loss(shuffled, labels, 100.0)
    assert good < 0.1 * bad
    assert good >= 0


@pytest.mark.parametrize(
    "m,d,tau,num_labels,spread,fallback",
    [
        (512, 16, 1.0, 6, 1.0, False),
        (300, 16, 1.0, 60, 0.5, False),  # many labels: rows without a positive, small blocks
        (256, 16, 100.0, 4, 0.5, True),  # every pair below the floor: the reference takes over
        (40, 3, 10.0, 30, 1.0, True),
        (64, 16, 1.0, 3, 6.0, True),
    ],
)
def test_fast_loss_and_gradient_equal_the_autograd_reference(m, d, tau, num_labels, spread, fallback, monkeypatch):
    """The written-out backward against autograd through logsumexp, including rows without a
    positive (many labels), and spreads where far pairs fall below the floor (there the fast path
    hands the batch to the reference: counted here)."""
    import trace3d_ns.features.contrastive as module

    calls = []
    monkeypatch.setattr(module, "contrastive_loss_reference", lambda *a: calls.append(1) or contrastive_loss_reference(*a))
    g = torch.Generator().manual_seed(m)
    labels = torch.randint(0, num_labels + 1, (m,), generator=g)  # 0: negatives only
    f = (torch.randn(m, d, generator=g) * spread).requires_grad_(True)
    fast = contrastive_loss(f, labels, tau)
    (grad_fast,) = torch.autograd.grad(fast, f)
    assert bool(calls) == fallback
    ref = contrastive_loss_reference(f, labels, tau)
    (grad_ref,) = torch.autograd.grad(ref, f)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    # float32 sums in another order: differences scale with the largest gradient
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-4, atol=2e-5 * float(grad_ref.abs().max()))
    assert float(grad_ref.abs().max()) > 0


@pytest.mark.parametrize("tau,spread,fallback", [(1.0, 0.7, False), (1.0, 6.0, True)])
def test_fast_loss_with_alike_labels_equals_the_reference(tau, spread, fallback, monkeypatch):
    """Pairs of labels marked alike leave each other's denominators, on the fast path and on the
    reference it falls back to."""
    import trace3d_ns.features.contrastive as module

    calls = []
    monkeypatch.setattr(module, "contrastive_loss_reference", lambda *a: calls.append(1) or contrastive_loss_reference(*a))
    g = torch.Generator().manual_seed(11)
    labels = torch.randint(0, 9, (300,), generator=g)
    alike = torch.rand(9, 9, generator=g) < 0.3
    alike = (alike | alike.T).fill_diagonal_(True)
    alike[0, 1:] = alike[1:, 0] = False  # unlabelled pixels are alike with nothing
    f = (torch.randn(300, 16, generator=g) * spread).requires_grad_(True)
    fast = contrastive_loss(f, labels, tau, alike)
    (grad_fast,) = torch.autograd.grad(fast, f)
    assert bool(calls) == fallback
    ref = contrastive_loss_reference(f, labels, tau, alike)
    (grad_ref,) = torch.autograd.grad(ref, f)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-4, atol=2e-5 * float(grad_ref.abs().max()))
    plain = contrastive_loss_reference(f, labels, tau)
    assert fast < plain  # fewer negatives in every denominator that had an alike pair


def test_alike_labels_are_no_negatives():
    """A whole object's mask over two parts: with the parts alike, features that put both parts at
    one point cost nothing; without, the parts still push each other away."""
    labels = torch.tensor([1, 1, 2, 2, 3, 3])
    f = torch.zeros(6, 4)
    f[4:, 0] = 10.0  # label 3 far away
    alike = torch.eye(4, dtype=torch.bool)
    alike[1, 2] = alike[2, 1] = True
    for loss_fn in (contrastive_loss, contrastive_loss_reference):
        assert float(loss_fn(f, labels, 1.0, alike)) == pytest.approx(0.0, abs=1e-6)
        assert float(loss_fn(f, labels, 1.0)) > 0.5  # log 3 for the anchors of labels 1 and 2
    with pytest.raises(ValueError, match="labels must lie in"):
        contrastive_loss(f, labels, 1.0, alike[:3, :3])
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(f, labels, 1.0, alike[:, :3])


def test_fast_loss_takes_the_gradient_of_the_upstream_scale():
    """loss * w backpropagates w times the gradient (the model weights the loss), on both paths."""
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 5, (200,), generator=g)
    for spread in (0.5, 8.0):  # fast path, reference path
        f = (torch.randn(200, 16, generator=g) * spread).requires_grad_(True)
        (unit,) = torch.autograd.grad(contrastive_loss(f, labels, 1.0), f)
        (scaled,) = torch.autograd.grad(0.1 * contrastive_loss(f, labels, 1.0), f)
        torch.testing.assert_close(scaled, 0.1 * unit)
        assert float(unit.abs().max()) > 0


@pytest.mark.parametrize("fallback", [False, True])
def test_the_loss_on_more_threads_gives_the_same_loss_and_gradient_and_restores_the_threads(fallback):
    g = torch.Generator().manual_seed(3)
    labels = torch.cat([torch.randint(1, 6, (300,), generator=g), torch.zeros(60, dtype=torch.long)])
    base = (8.0 if fallback else 0.3) * torch.randn(360, 16, generator=g)  # far apart: the reference path
    before = torch.get_num_threads()
    out = {}
    for threads in (None, before + 1):
        f = base.clone().requires_grad_(True)
        loss = contrastive_loss(f, labels, 1.0, threads=threads)
        assert torch.get_num_threads() == before
        loss.backward()
        assert torch.get_num_threads() == before
        out[threads] = (loss.detach(), f.grad)
    (l1, g1), (l2, g2) = out.values()
    torch.testing.assert_close(l2, l1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g2, g1, atol=1e-7, rtol=1e-4)


def test_the_model_runs_its_loss_on_the_kernels_threads_unless_told():
    from trace3d_ns.cuda import compiled

    model = _model(None)
    assert model.backend == "compiled"
    before = compiled.kernel_threads()
    try:
        compiled.set_threads(1)
        assert model._contrastive_threads() == 1  # e.g. NUMBA_NUM_THREADS=1 beside another training
        compiled.set_threads(0)
        assert model._contrastive_threads() == compiled.kernel_threads()
    finally:
        compiled.set_threads(before)
    model.config.contrastive_threads = 3
    assert model._contrastive_threads() == 3
    model.backend = "torch"
    model.config.contrastive_threads = 0
    assert model._contrastive_threads() is None


def test_loss_ignores_pixels_without_positives():
    f = torch.randn(3, 4, requires_grad=True)
    loss = contrastive_loss(f, torch.tensor([1, 2, 3]), 10.0)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable


def test_sampling_takes_only_labelled_pixels():
    labels = torch.zeros(10, 10, dtype=torch.int32)
    labels[2:5, 3:8] = 7
    picked = sample_labelled_pixels(labels, 8, torch.Generator().manual_seed(1))
    assert picked.numel() == 8 and (labels.reshape(-1)[picked] == 7).all()
    assert picked.unique().numel() == 8
    assert sample_labelled_pixels(labels, 100).numel() == 15


def test_sampling_adds_unlabelled_pixels_after_the_labelled_ones():
    labels = torch.zeros(10, 10, dtype=torch.int32)
    labels[2:5, 3:8] = 7  # 15 labelled, 85 unlabelled
    picked = sample_labelled_pixels(labels, 8, torch.Generator().manual_seed(1), num_unlabelled=20)
    assert picked.numel() == 28 and picked.unique().numel() == 28
    assert (labels.reshape(-1)[picked[:8]] == 7).all() and (labels.reshape(-1)[picked[8:]] == 0).all()
    assert sample_labelled_pixels(labels, 100, num_unlabelled=1000).numel() == 100


def _three_instances():
    """labels [100, 100]: instance 5 of 6000 pixels, 2 of 1500, a thin 9 of 20, the rest 0; and flattened."""
    labels = torch.zeros(100, 100, dtype=torch.int32)
    labels[:60] = 5
    labels[60:90, :50] = 2
    labels[95:, :4] = 9
    return labels, labels.reshape(-1)


def test_balanced_sampling_gives_every_instance_its_share():
    labels, flat = _three_instances()
    for seed in range(3):
        picked = sample_labelled_pixels(labels, 300, torch.Generator().manual_seed(seed), num_unlabelled=10, balanced=True)
        assert picked.numel() == 310 and picked.unique().numel() == 310
        counts = torch.bincount(flat[picked[:300]].long(), minlength=10)
        assert counts[9] == 20 and counts[5] == counts[2] == 140  # the thin object whole, the rest split evenly
        assert (flat[picked[300:]] == 0).all()
    uniform = sample_labelled_pixels(labels, 300, torch.Generator().manual_seed(0))
    assert torch.bincount(flat[uniform].long(), minlength=10)[9] < 10  # ~0.8 expected
    a = sample_labelled_pixels(labels, 300, torch.Generator().manual_seed(4), balanced=True)
    b = sample_labelled_pixels(labels, 300, torch.Generator().manual_seed(5), balanced=True)
    assert not torch.equal(a.sort().values, b.sort().values)  # random within each instance
    small = torch.zeros(4, 4, dtype=torch.int32)
    small[0, :2], small[1, :] = 1, 2
    small[2, :], small[3, 0] = 3, 3  # 2, 4 and 5 pixels, budget 9: quota 3 (2 + 3 + 3), one more at random
    picked = sample_labelled_pixels(small, 9, torch.Generator().manual_seed(0), balanced=True)
    counts = torch.bincount(small.reshape(-1)[picked].long(), minlength=4).tolist()
    assert picked.unique().numel() == 9 and counts[1] == 2 and sorted(counts[2:]) == [3, 4]


def test_a_minimum_per_instance_reserves_samples_and_leaves_the_rest_uniform():
    labels, flat = _three_instances()
    counts = torch.zeros(10)
    for seed in range(20):
        picked = sample_labelled_pixels(labels, 300, torch.Generator().manual_seed(seed), min_per_label=16)
        assert picked.numel() == 300 and picked.unique().numel() == 300
        c = torch.bincount(flat[picked].long(), minlength=10)
        assert c[9] >= 16 and c[2] >= 16 and c[5] >= 16  # every instance has its minimum
        counts += c
    # beyond the 48 reserved, the 252 others follow the unreserved pixels (5984 : 1484 : 4)
    assert abs(counts[5] / 20 - (16 + 252 * 5984 / 7472)) < 6 and abs(counts[2] / 20 - (16 + 252 * 1484 / 7472)) < 6
    tight = sample_labelled_pixels(labels, 30, torch.Generator().manual_seed(0), min_per_label=16)  # 3 x 16 > 30
    assert torch.bincount(flat[tight].long(), minlength=10)[[2, 5, 9]].tolist() == [10, 10, 10]


@pytest.mark.parametrize("loss_fn", [contrastive_loss, contrastive_loss_reference])
def test_unlabelled_pixels_are_negatives_only(loss_fn):
    """A label-0 pixel is never a positive nor an anchor: far from everything it changes nothing,
    two of them at one feature do not attract each other, and on an object's feature it raises the
    loss and its gradient pushes it away from that object."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, 1, 1, 2, 2, 2])
    f = torch.cat([torch.zeros(3, 4), torch.ones(3, 4)]) + 0.05 * torch.randn(6, 4, generator=g)
    base = loss_fn(f, labels, 1.0)
    far = torch.full((2, 4), 1e3)  # two unlabelled pixels at the same far-away feature
    assert torch.allclose(loss_fn(torch.cat([f, far]), torch.cat([labels, torch.zeros(2, dtype=labels.dtype)]), 1.0), base)
    centre = f[:3].mean(dim=0)
    on_object = (centre + 0.1 * torch.tensor([0.6, 0.0, -0.8, 0.0]))[None].requires_grad_(True)  # near object 1
    loss = loss_fn(torch.cat([f, on_object]), torch.cat([labels, torch.zeros(1, dtype=labels.dtype)]), 1.0)
    assert loss > base + 0.05
    (grad,) = torch.autograd.grad(loss, on_object)
    stepped = on_object.detach() - 0.01 * grad / grad.norm()  # a small descent step
    assert (stepped[0] - centre).norm() > (on_object.detach()[0] - centre).norm()


def _trained_model():
    from nerfstudio.engine.optimizers import Optimizers
    from trace3d_ns.config import trace3d_trainer_config

    g = torch.Generator().manual_seed(0)
    model = _model((torch.rand(300, 3, generator=g) - 0.5, torch.randint(0, 255, (300, 3), generator=g)))
    model.config.feature_start_step = 0
    optimizers = Optimizers(trace3d_trainer_config().optimizers, model.get_param_groups())
    model.step_cb(optimizers, 0)
    return model, optimizers


def test_features_render_train_and_leave_geometry_alone():
    model, _ = _trained_model()
    assert model.gauss_params["features"].shape == (300, 16)
    model.train()
    out = model.get_outputs(_camera())
    H, W = model.last_size
    assert out["feature"].shape == (H, W, 16)
    patches = torch.zeros(30, 40, dtype=torch.int32)
    patches[:, :20], patches[:, 20:] = 1, 2
    losses = model.get_loss_dict(out, {"image": torch.rand(30, 40, 3), "patches": patches})
    assert losses["contrastive_loss"] > 0
    losses["contrastive_loss"].backward()
    assert model.gauss_params["features"].grad.abs().sum() > 0
    assert model.means.grad is None or model.means.grad.abs().sum() == 0  # detached geometry by default


def test_model_leaves_alike_patches_out_of_the_loss_when_configured():
    """``contrastive_alike_by_masks``: two raw patches one mask covers together are no negatives
    (a lower loss on the same samples); with consistent instance maps the matrix is not used."""
    model, _ = _trained_model()
    model.train()
    torch.manual_seed(0)
    out = model.get_outputs(_camera())
    patches = torch.zeros(30, 40, dtype=torch.int32)
    patches[:, :20], patches[:, 20:30], patches[:, 30:] = 1, 2, 3
    alike = torch.eye(4, dtype=torch.bool)
    alike[1, 2] = alike[2, 1] = True
    batch = {"image": torch.rand(30, 40, 3), "patches": patches, "patch_alike": alike}
    model._pick_contrastive_pixels = lambda labels: sample_labelled_pixels(labels, 60, torch.Generator().manual_seed(3))

    def loss(b):
        return float(model.get_loss_dict(out, b)["contrastive_loss"])

    assert model.config.contrastive_alike_by_masks  # the default
    model.config.contrastive_alike_by_masks = False
    plain = loss(batch)
    model.config.contrastive_alike_by_masks = True
    assert loss(batch) < plain
    assert loss({k: v for k, v in batch.items() if k != "patch_alike"}) == pytest.approx(plain)  # an old cache
    model.config.contrastive_raw_weight = 0.0
    assert loss({**batch, "instances": patches}) == pytest.approx(plain)  # consistent ids: no matrix
    model.config.contrastive_raw_weight = 0.5
    assert loss({**batch, "instances": patches}) < plain  # its raw-patch share uses the matrix


def test_model_mixes_the_raw_patches_into_the_loss_on_consistent_maps_when_configured():
    """``contrastive_raw_weight``: with consistent maps as labels, (1 - w) of the loss comes from
    them and w from the raw patches at the same samples; 0 leaves the consistent loss alone."""
    from trace3d_ns.features.contrastive import contrastive_loss

    model, _ = _trained_model()
    model.train()
    torch.manual_seed(0)
    out = model.get_outputs(_camera())
    patches = torch.zeros(30, 40, dtype=torch.int32)
    patches[:, :20], patches[:, 20:] = 1, 2
    instances = torch.ones(30, 40, dtype=torch.int32)  # merging joined the two patches
    batch = {"image": torch.rand(30, 40, 3), "patches": patches, "instances": instances}
    from trace3d_ns.data.patches import downscale_patches

    labels = model.training_labels(batch).reshape(-1)  # the consistent ids at the render's size
    picked = sample_labelled_pixels(labels.reshape(model.last_size), 40, torch.Generator().manual_seed(3))
    model._pick_contrastive_pixels = lambda labels: picked
    features = out["feature"].reshape(-1, out["feature"].shape[-1])[picked]
    tau, weight = model.config.contrastive_temperature, model.config.contrastive_weight
    consistent = contrastive_loss(features, labels[picked], tau)
    raw = contrastive_loss(features, downscale_patches(patches, model.last_size).reshape(-1)[picked], tau)
    model.config.contrastive_raw_weight = 0.0
    torch.testing.assert_close(model.get_loss_dict(out, batch)["contrastive_loss"], weight * consistent)
    model.config.contrastive_raw_weight = 0.25
    mixed = model.get_loss_dict(out, batch)["contrastive_loss"]
    torch.testing.assert_close(mixed, weight * (0.75 * consistent + 0.25 * raw))
    assert abs(float(raw - consistent)) > 1e-3  # the mix differs from either loss
    model.masks_span_patches = False  # masks that partition every view: the consistent ids alone
    torch.testing.assert_close(model.get_loss_dict(out, batch)["contrastive_loss"], weight * consistent)


def test_model_samples_balanced_when_configured():
    model, _ = _trained_model()
    labels = torch.zeros(60, 80, dtype=torch.int32)
    labels[:, :70], labels[10:30, 74:76] = 1, 2  # a large object and a thin one of 40 pixels
    model.config.contrastive_samples, model.config.contrastive_unlabelled_samples = 100, 0
    thin = lambda picked: int((labels.reshape(-1)[picked] == 2).sum())  # noqa: E731
    torch.manual_seed(0)
    assert thin(model._pick_contrastive_pixels(labels)) < 10  # uniform: about 1 expected
    model.config.contrastive_balanced = True
    assert thin(model._pick_contrastive_pixels(labels)) == 40


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_planned_contrastive_pixels_give_the_unplanned_loss_and_gradients(backend):
    """A planned step (the pipeline hands the batch over before the render) composites the features
    only at the sampled pixels: the loss and every gradient equal those of a full feature render
    with the same samples."""
    patches = torch.zeros(30, 40, dtype=torch.int32)
    patches[:, :20], patches[5:25, 25:35] = 1, 2
    batch = {"image": torch.rand(30, 40, 3, generator=torch.Generator().manual_seed(1)), "patches": patches}
    results = {}
    for planned in (False, True):
        torch.manual_seed(0)  # the same initial features
        model, _ = _trained_model()
        model.config.rasterizer = backend
        model._pick_contrastive_pixels = lambda labels: sample_labelled_pixels(  # the same samples either way
            labels, 12, torch.Generator().manual_seed(3), num_unlabelled=4
        )
        model.train()
        if planned:
            model.plan_contrastive_samples(batch)
        torch.manual_seed(7)  # the same random background
        out = model.get_outputs(_camera())
        feature = out["feature"]
        losses = model.get_loss_dict(out, batch)
        sum(losses.values()).backward()
        grads = {k: p.grad.clone() for k, p in model.gauss_params.items() if p.grad is not None}
        results[planned] = (losses, grads, feature.detach())
    (loss_a, grads_a, full), (loss_b, grads_b, sparse) = results[False], results[True]
    assert (sparse != 0).any(dim=-1).sum() <= 16 < (full != 0).any(dim=-1).sum()  # features only at the samples
    torch.testing.assert_close(loss_b["contrastive_loss"], loss_a["contrastive_loss"])
    assert loss_a["contrastive_loss"] > 0 and grads_a.keys() == grads_b.keys() and "features" in grads_a
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], atol=1e-6, rtol=1e-4)


def test_feature_gradients_reach_geometry_when_asked():
    model, _ = _trained_model()
    model.config.feature_grad_to_geometry = True
    model.train()
    out = model.get_outputs(_camera())
    out["feature"].square().sum().backward()
    assert model.means.grad.abs().sum() > 0


def test_features_follow_densification_and_checkpoints():
    model, _ = _trained_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    other = _model(None)  # different Gaussian count: load_state_dict resizes everything
    other.load_state_dict(state)
    assert other.gauss_params["features"].shape == (300, 16)
    torch.testing.assert_close(other.gauss_params["features"], model.gauss_params["features"])


def test_pca_projection_is_stable():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(5000, 16, generator=g) @ torch.randn(16, 16, generator=g)
    a = FeaturePCA().fit(feats)
    b = FeaturePCA().fit(feats.flip(0))  # same data, other order
    x = feats[:100]
    torch.testing.assert_close(a.project(x), a.project(x))
    torch.testing.assert_close(a.project(x), b.project(x), atol=1e-4, rtol=1e-4)
    assert a.project(x).min() >= 0 and a.project(x).max() <= 1


def test_palette_is_distinct_and_background_black():
    pal = instance_palette(64)
    assert torch.equal(pal[0], torch.zeros(3))
    d = torch.cdist(pal[1:], pal[1:]) + torch.eye(63) * 10
    assert d.min() > 0.02
    assert colorize_ids(torch.tensor([[0, 3]])).shape == (1, 2, 3)


def test_feature_clustering_recovers_separated_instances():
    from trace3d_ns.features.clustering import FeatureClusteringConfig, cluster_features

    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    truth = torch.arange(3).repeat_interleave(torch.tensor([400, 250, 120]))  # sizes: ids follow them
    scale = 0.5 + 2.0 * torch.rand(770, 1, generator=g)  # norms vary: clustering is by direction
    features = scale * (directions[truth] + 0.05 * torch.randn(770, 16, generator=g))
    stray = -directions.sum(0, keepdim=True) * 3.0  # unlike every cluster
    labels, confidence = cluster_features(torch.cat([features, stray]), FeatureClusteringConfig(max_samples=500))
    assert torch.equal(labels[:770], truth + 1)  # every Gaussian, sampled or not, in its own cluster
    assert labels[770] == 0 and confidence[770] == 0.0
    assert (confidence[:770] > 0.9).all()


def test_features_of_one_object_form_one_cluster():
    """A scene that is one object (the Blender LEGO: no background Gaussians) lifts one feature
    direction; HDBSCAN alone calls that all noise, which left every Gaussian unlabelled."""
    from trace3d_ns.features.clustering import FeatureClusteringConfig, cluster_features

    g = torch.Generator().manual_seed(1)
    direction = torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=-1)
    features = direction + 0.05 * torch.randn(600, 16, generator=g)
    labels, confidence = cluster_features(features, FeatureClusteringConfig(max_samples=400))
    assert torch.equal(labels, torch.ones(600, dtype=torch.long)) and (confidence > 0.9).all()
    few = cluster_features(features[:10], FeatureClusteringConfig(min_cluster_size=30))[0]
    assert torch.equal(few, torch.zeros(10, dtype=torch.long))  # fewer than a cluster's size: none
