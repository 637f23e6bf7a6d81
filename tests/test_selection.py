"""Point prompts to Gaussians: by feature similarity and by instance vote."""

import pytest
import torch

from tests.test_method import _camera, _model
from trace3d_ns.selection import camera_contributions, pixel_weights, render_subset_alpha, select_from_point


def _two_cluster_model():
    """Left and right clusters in front of the camera, with distinct features and labels."""
    g = torch.Generator().manual_seed(0)
    left = torch.randn(150, 3, generator=g) * 0.08 + torch.tensor([-0.5, 0.0, 0.0])
    right = torch.randn(150, 3, generator=g) * 0.08 + torch.tensor([0.5, 0.0, 0.0])
    model = _model((torch.cat([left, right]), torch.full((300, 3), 128)))
    with torch.no_grad():
        model.gauss_params["scales"].fill_(-3.0)
        model.gauss_params["opacities"].fill_(3.0)
        model.gauss_params["features"][:150] = torch.tensor([1.5] + [0.0] * 15)
        model.gauss_params["features"][150:] = torch.tensor([-1.5] + [0.0] * 15)
    model.instance_labels = torch.cat([torch.full((150,), 1), torch.full((150,), 2)])
    model.eval()
    return model


def _pixel_of(model, camera, mask):
    alpha = render_subset_alpha(model, camera, mask)
    ys, xs = torch.nonzero(alpha > 0.9, as_tuple=True)
    return float(xs[len(xs) // 2]), float(ys[len(ys) // 2])


@pytest.mark.parametrize("mode", ["feature", "instance", "traced"])
def test_clicking_a_cluster_selects_exactly_it(mode):
    model, cam = _two_cluster_model(), _camera(64, 48)
    model.selection_cameras = cam
    left = torch.arange(300) < 150
    xy = _pixel_of(model, cam, left)
    ids, w = pixel_weights(model, cam, xy)
    assert ids.numel() > 0 and (ids < 150).float().mean() > 0.5
    selected = select_from_point(model, cam, xy, mode=mode)
    assert torch.equal(selected, left)
    selected = select_from_point(model, cam, _pixel_of(model, cam, ~left), mode=mode)
    assert torch.equal(selected, ~left)


def test_selection_renders_only_its_silhouette_and_errors_are_clear():
    model, cam = _two_cluster_model(), _camera(64, 48)
    left = torch.arange(300) < 150
    a_left, a_right = render_subset_alpha(model, cam, left), render_subset_alpha(model, cam, ~left)
    assert ((a_left > 0.5) & (a_right > 0.5)).sum() == 0  # disjoint silhouettes
    assert (a_left > 0.5).sum() > 20
    with pytest.raises(ValueError, match="outside"):
        select_from_point(model, cam, (64, 0))
    model.instance_labels = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="no instance labels"):
        select_from_point(model, cam, (10, 10), mode="instance")


def _dense_traced_share(model, cameras, query, threshold):
    """Reference: dense [N, HW] weights per view; a pixel is predicted when its rendered (alpha-
    normalised) feature's cosine with `query` >= threshold; share = predicted weight / all weight."""
    f = model.gauss_params["features"].detach()
    inside, total = torch.zeros(f.shape[0]), torch.zeros(f.shape[0])
    for i in range(len(cameras)):
        c = camera_contributions(model, cameras[i : i + 1])
        w = torch.zeros(f.shape[0], c.width * c.height)
        w[c.gaussian_ids, c.pixel_ids] = c.weights
        alpha = w.sum(0)
        rendered = (w.T @ f) / alpha.clamp(min=1e-6)[:, None]  # [HW, D]
        cos = torch.nn.functional.cosine_similarity(rendered, query[None], dim=-1)
        predicted = (cos >= threshold).float()
        inside += w @ predicted
        total += w.sum(1)
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.full_like(total, -1.0))


def _with_a_straddler(model):
    """Adds a faint Gaussian in front of the right cluster that carries the left cluster's feature
    (as a Gaussian spanning two objects gets trained by both): the mean of its pixels' rendered
    features still points left, but most of its weight lies on pixels that render right."""
    params = model.gauss_params
    with torch.no_grad():
        extra = {k: torch.cat([v, v[:1]]) for k, v in params.items()}
        extra["means"][-1] = torch.tensor([0.5, 0.0, 0.4])
        extra["scales"][-1] = torch.log(torch.tensor([0.15, 0.15, 0.01]))
        extra["opacities"][-1] = torch.logit(torch.tensor([0.35]))
        extra["features"][-1] = params["features"][0]
    for k, v in extra.items():
        params[k] = torch.nn.Parameter(v)
    model.instance_labels = torch.cat([model.instance_labels, torch.tensor([1])])
    return model


def test_traced_selection_equals_the_dense_reference_and_leaves_out_a_straddler():
    from trace3d_ns.features.backprojection import traced_match_share
    from trace3d_ns.selection import pixel_feature, select_by_traced_feature

    model, cam = _with_a_straddler(_two_cluster_model()), _camera(64, 48)
    left = torch.arange(301) < 150
    xy = _pixel_of(model, cam, left)
    query = pixel_feature(model, cam, xy)
    share = traced_match_share(model, cam, query, 0.7)
    torch.testing.assert_close(share, _dense_traced_share(model, cam, query, 0.7), rtol=1e-4, atol=1e-5)
    assert 0.0 < share[300] < 0.66  # the straddler: partly on predicted pixels
    assert select_from_point(model, cam, xy, mode="feature")[300]  # the mean of its pixels still matches
    with pytest.raises(ValueError, match="training cameras"):
        select_by_traced_feature(model, query)
    model.selection_cameras = cam
    assert torch.equal(select_from_point(model, cam, xy, mode="traced"), left)


def test_feature_instance_cuts_a_feature_leak_with_the_label_and_a_merged_label_with_features():
    from trace3d_ns.evaluation.harness import EvaluationError, resolve_mode

    model, cam = _two_cluster_model(), _camera(64, 48)
    left = torch.arange(300) < 150
    xy = _pixel_of(model, cam, left)
    with torch.no_grad():  # both clusters share one feature: feature selection takes them both
        model.gauss_params["features"][:] = torch.tensor([1.5] + [0.0] * 15)
    assert torch.equal(select_from_point(model, cam, xy, mode="feature"), torch.ones(300, dtype=torch.bool))
    assert torch.equal(select_from_point(model, cam, xy, mode="feature_instance"), left)
    model = _two_cluster_model()
    model.instance_labels = torch.ones(300, dtype=torch.long)  # one label over both: the features split them
    assert torch.equal(select_from_point(model, cam, xy, mode="feature_instance"), left)
    model.instance_labels = torch.zeros(300, dtype=torch.long)  # nothing labelled at the click: features alone
    assert torch.equal(select_from_point(model, cam, xy, mode="feature_instance"), left)
    assert resolve_mode(model, "feature_instance") == "feature_instance"
    model.instance_labels = torch.zeros(0, dtype=torch.long)
    with pytest.raises(EvaluationError, match="feature_instance needs instance labels"):
        resolve_mode(model, "feature_instance")


def test_auto_selects_by_feature_within_the_instance_when_the_model_has_both():
    from trace3d_ns.evaluation.harness import resolve_mode
    from trace3d_ns.selection import auto_mode

    model, cam = _two_cluster_model(), _camera(64, 48)
    left = torch.arange(300) < 150
    xy = _pixel_of(model, cam, left)
    with torch.no_grad():  # one feature over both clusters: feature selection leaks onto the right one
        model.gauss_params["features"][:] = torch.tensor([1.5] + [0.0] * 15)
    assert auto_mode(model) == resolve_mode(model, "auto") == "feature_instance"
    assert torch.equal(select_from_point(model, cam, xy), left)  # the label cuts the leak
    model.instance_labels = torch.zeros(0, dtype=torch.long)  # no labels (GIT has not run): features alone
    assert auto_mode(model) == resolve_mode(model, "auto") == "feature"
    assert torch.equal(select_from_point(model, cam, xy), torch.ones(300, dtype=torch.bool))
    model = _two_cluster_model()
    del model.gauss_params["features"]  # no feature field: the labels
    assert auto_mode(model) == "instance"
    assert torch.equal(select_from_point(model, cam, xy), left)
