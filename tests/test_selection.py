"""Point prompts to Gaussians: by feature similarity and by instance vote."""

import pytest
import torch

from tests.test_method import _camera, _model
from trace3d_ns.selection import pixel_weights, render_subset_alpha, select_from_point


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


@pytest.mark.parametrize("mode", ["feature", "instance"])
def test_clicking_a_cluster_selects_exactly_it(mode):
    model, cam = _two_cluster_model(), _camera(64, 48)
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
