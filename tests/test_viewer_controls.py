"""InstanceViewerControls, headless: click selection, threshold, clear, export, PCA, extra outputs."""

from types import SimpleNamespace

import torch

from tests.test_method import _camera, _model
from trace3d_ns.export.ply import read_ply
from trace3d_ns.features.palette import instance_palette
from trace3d_ns.selection import camera_contributions, render_subset_alpha
from trace3d_ns.viewer_controls import ARMED, InstanceViewerControls, click_pixel, top_instance_ids

LEFT = torch.arange(300) < 150
W, H = 64, 48


def _two_clusters(with_features: bool = True):
    """Left / right clusters in view, features +-0.3 on axis 0 plus noise (labels are up to the tests)."""
    g = torch.Generator().manual_seed(0)
    left = torch.randn(150, 3, generator=g) * 0.08 + torch.tensor([-0.5, 0.0, 0.0])
    right = torch.randn(150, 3, generator=g) * 0.08 + torch.tensor([0.5, 0.0, 0.0])
    model = _model((torch.cat([left, right]), torch.full((300, 3), 128)))
    model.config.feature_start_step = 0
    with torch.no_grad():
        model.gauss_params["scales"].fill_(-3.0)
        model.gauss_params["opacities"].fill_(3.0)
        centres = torch.zeros(300, 16)
        centres[:, 0] = torch.where(LEFT, 0.3, -0.3)
        model.gauss_params["features"].copy_(centres + 0.06 * torch.randn(300, 16, generator=g))
    if not with_features:
        del model.gauss_params["features"]
    model.eval()
    return model


def _controls(model) -> InstanceViewerControls:
    """The model's controls (once the model builds them itself), else new ones attached like it will."""
    if not isinstance(getattr(model, "viewer_controls", None), InstanceViewerControls):
        model.viewer_controls = InstanceViewerControls(model)
    return model.viewer_controls


def _click_on(model, camera, mask) -> SimpleNamespace:
    """A fake `ViewerClick` at the middle of the covered pixels of the Gaussians in `mask`."""
    ys, xs = torch.nonzero(render_subset_alpha(model, camera, mask) > 0.9, as_tuple=True)
    x, y = xs[len(xs) // 2].item() + 0.5, ys[len(ys) // 2].item() + 0.5
    return SimpleNamespace(screen_pos=(x / W, y / H))


def test_click_pixel_maps_normalised_screen_positions_to_pixels():
    cam = _camera(W, H)
    assert click_pixel(cam, (0.0, 0.0)) == (0, 0)
    assert click_pixel(cam, ((20 + 0.5) / W, (25 + 0.5) / H)) == (20, 25)
    assert click_pixel(cam, (1.0, 1.0)) == (W - 1, H - 1)  # the far edge is the last pixel


def test_click_selects_the_clicked_cluster_and_clear_empties_it():
    model, cam = _two_clusters(), _camera(W, H)
    controls = _controls(model)
    assert controls.selection() is None and controls.select_status.value == "nothing"
    controls.select_threshold.value = 0.01
    controls.on_click(_click_on(model, cam, LEFT), cam)
    assert torch.equal(controls.selection(), LEFT)
    assert controls.select_status.value == "150 Gaussians"
    controls.on_click(_click_on(model, cam, ~LEFT), cam)
    assert torch.equal(controls.selection(), ~LEFT)
    controls.on_clear()
    assert controls.selection() is None and controls.select_status.value == "nothing"


def test_click_on_nothing_keeps_the_selection():
    model, cam = _two_clusters(), _camera(W, H)
    controls = _controls(model)
    controls.on_click(_click_on(model, cam, LEFT), cam)
    before = controls.selection()
    controls.on_click(SimpleNamespace(screen_pos=(0.5, 0.02)), cam)  # above both clusters
    assert torch.equal(controls.selection(), before)


def test_without_features_a_click_selects_by_instance_label():
    model, cam = _two_clusters(with_features=False), _camera(W, H)
    controls = InstanceViewerControls(model)
    assert controls.select_mode.options == ["auto", "instance"]
    controls.on_click(_click_on(model, cam, LEFT), cam)
    assert controls.selection() is None  # no labels yet: nothing to vote with
    model.instance_labels = torch.where(LEFT, 1, 2)
    controls.on_click(_click_on(model, cam, ~LEFT), cam)
    assert torch.equal(controls.selection(), ~LEFT)


def test_instance_mode_selects_by_label_even_with_features():
    model, cam = _two_clusters(), _camera(W, H)
    model.instance_labels = torch.where(LEFT, 7, 3)
    controls = _controls(model)
    controls.select_mode.value = "instance"
    controls.select_threshold.value = 0.99  # ignored by instance selection
    controls.on_click(_click_on(model, cam, LEFT), cam)
    assert torch.equal(controls.selection(), LEFT)
    controls.select_mode.value = "feature"
    controls.on_click(_click_on(model, cam, LEFT), cam)
    assert controls.selection().sum() < 150  # the threshold applies again


def test_auto_mode_cuts_a_feature_leak_with_the_clicked_label():
    model, cam = _two_clusters(), _camera(W, H)
    with torch.no_grad():  # one feature over both clusters: feature selection takes them both
        model.gauss_params["features"][:] = torch.tensor([1.0] + [0.0] * (model.gauss_params["features"].shape[1] - 1))
    controls = _controls(model)
    controls.select_mode.value = "feature"
    controls.on_click(_click_on(model, cam, LEFT), cam)
    assert bool(controls.selection().all())
    model.instance_labels = torch.where(LEFT, 7, 3)
    controls.select_mode.value = "auto"  # features and labels: feature similarity within the clicked label
    controls.on_click(_click_on(model, cam, LEFT), cam)
    assert torch.equal(controls.selection(), LEFT)


def test_traced_mode_selects_the_cluster_and_keeps_its_result_until_something_changes(monkeypatch):
    import trace3d_ns.viewer_controls as vc

    model, cam = _two_clusters(), _camera(W, H)
    model.selection_cameras = cam
    controls = _controls(model)
    assert "traced" in controls.select_mode.options
    controls.select_mode.value = "traced"
    controls.select_threshold.value = 0.5
    calls = []
    traced = vc.select_by_traced_feature
    monkeypatch.setattr(vc, "select_by_traced_feature", lambda *a: calls.append(a[2]) or traced(*a))
    controls.on_click(_click_on(model, cam, LEFT), cam)
    assert torch.equal(controls.selection(), LEFT) and controls.select_status.value == "150 Gaussians"
    controls.selection()  # a viewer frame: no new pass over the views
    assert calls == [0.5]
    controls.select_threshold.value = 0.95
    controls.on_threshold(controls.select_threshold)
    assert calls == [0.5, 0.95] and not (controls.selection() & ~LEFT).any()


def test_threshold_slider_reapplies_to_the_last_click_monotonically():
    model, cam = _two_clusters(), _camera(W, H)
    controls = _controls(model)
    controls.on_click(_click_on(model, cam, LEFT), cam)
    counts = []
    for t in (0.01, 0.3, 0.6, 0.7, 0.8, 0.9):
        controls.select_threshold.value = t
        controls.on_threshold(controls.select_threshold)
        mask = controls.selection()
        assert not (mask & ~LEFT).any()
        counts.append(int(mask.sum()))
        assert controls.select_status.value == f"{counts[-1]} Gaussians"
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 150 and counts[-1] < counts[2] < 150


def test_export_writes_exactly_the_selection(tmp_path):
    model, cam = _two_clusters(), _camera(W, H)
    controls = _controls(model)
    controls.selection_export_dir.value = str(tmp_path)
    assert controls.on_export() is None  # nothing selected
    controls.select_threshold.value = 0.5
    controls.on_click(_click_on(model, cam, LEFT), cam)
    mask = controls.selection()
    first, second = controls.on_export(), controls.on_export()
    assert first == tmp_path / "selection_000.ply" and second == tmp_path / "selection_001.ply"
    columns = read_ply(first)
    assert 0 < len(columns["x"]) == int(mask.sum()) < 150
    expected = model.means[mask].detach().numpy()
    assert (columns["x"] == expected[:, 0]).all() and (columns["z"] == expected[:, 2]).all()


def test_pca_is_fitted_once_and_the_button_refits():
    model, cam = _two_clusters(), _camera(W, H)
    controls = _controls(model)
    assert not model.feature_pca.fitted
    outputs = model.get_outputs_for_camera(cam)
    a = controls.extra_outputs(cam, outputs)["feature_pca"]
    basis = model.feature_pca.basis.clone()
    with torch.no_grad():
        model.gauss_params["features"].mul_(torch.linspace(0.5, 2.0, 16))
    b = controls.extra_outputs(cam, outputs)["feature_pca"]
    assert torch.equal(a, b) and torch.equal(model.feature_pca.basis, basis)  # stable between frames
    controls.on_pca_refit(controls.pca_refit)
    assert not torch.allclose(model.feature_pca.basis, basis)


def test_extra_outputs_keys_shapes_and_dtypes():
    model, cam = _two_clusters(), _camera(W, H)
    controls = _controls(model)
    outputs = model.get_outputs_for_camera(cam)
    assert set(controls.extra_outputs(cam, outputs)) == {"feature_pca"}  # no labels, no selection

    model.instance_labels = torch.where(LEFT, 1, 2)
    controls.on_click(_click_on(model, cam, LEFT), cam)
    extra = controls.extra_outputs(cam, outputs)
    assert set(extra) == {"feature_pca", "instance", "selection"}
    for image in extra.values():
        assert image.shape == outputs["rgb"].shape == (H, W, 3) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1

    palette = instance_palette(3)
    left_alpha = render_subset_alpha(model, cam, LEFT) > 0.9
    right_alpha = render_subset_alpha(model, cam, ~LEFT) > 0.9
    assert (extra["instance"][left_alpha] == palette[1]).all() and (extra["instance"][right_alpha] == palette[2]).all()
    assert (extra["instance"][0, 0] == 0).all()  # empty corner: no Gaussian, black
    tint = extra["selection"] - 0.3 * outputs["rgb"]
    assert tint[left_alpha].mean() > 0.2 and tint[right_alpha].abs().max() < 0.05  # only the clicked object


def test_instance_ids_are_the_labels_of_each_pixels_heaviest_gaussian():
    model, cam = _two_clusters(), _camera(W, H)
    model.instance_labels = torch.randint(1, 6, (300,), generator=torch.Generator().manual_seed(1))
    ids = top_instance_ids(model, cam)
    c = camera_contributions(model, cam)
    heaviest = {}  # pixel -> (weight, gaussian)
    for g, p, w in zip(c.gaussian_ids.tolist(), c.pixel_ids.tolist(), c.weights.tolist()):
        heaviest[p] = max(heaviest.get(p, (w, g)), (w, g))
    expected = torch.zeros(H * W, dtype=torch.long)
    for p, (_, g) in heaviest.items():
        expected[p] = model.instance_labels[g]
    assert ids.shape == (H, W) and torch.equal(ids.flatten(), expected)
    assert len(heaviest) > 200 and len(set(expected.tolist())) == 6  # mixed labels under the pixels


def test_extra_outputs_without_features_or_labels_are_empty():
    model, cam = _two_clusters(with_features=False), _camera(W, H)
    outputs = model.get_outputs_for_camera(cam)
    assert "feature" not in outputs
    assert _controls(model).extra_outputs(cam, outputs) == {}


def test_controls_add_nothing_to_the_state_dict_and_the_viewer_finds_them():
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement

    model, cam = _two_clusters(), _camera(W, H)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    controls = _controls(model)
    controls.on_click(_click_on(model, cam, LEFT), cam)
    controls.extra_outputs(cam, model.get_outputs_for_camera(cam))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert list(controls.parameters()) == [] and list(controls.buffers()) == [] and list(controls.children()) == []

    found = dict(parse_object(model, ViewerElement, "Custom Elements"))
    stub = "Custom Elements/viewer_controls/"
    names = ["pca_refit", "select_by_click", "select_mode", "select_status", "select_threshold",
             "selection_clear", "selection_export", "selection_export_dir"]  # fmt: skip
    assert all(found[stub + n] is getattr(controls, n) for n in names)
    assert [e for _, e in parse_object(model, ViewerControl, "Custom Elements")] == [controls.viewer_control]


def test_select_button_without_viewer_does_nothing():
    model = _two_clusters()
    controls = _controls(model)
    controls.on_select_by_click(controls.select_by_click)
    assert controls.selection() is None and controls.select_status.value == "nothing"  # not armed


def test_select_button_arms_a_one_shot_click_in_the_viewer():
    model, cam = _two_clusters(), _camera(W, H)
    controls = _controls(model)
    events = []
    controls.viewer_control = SimpleNamespace(
        viewer=SimpleNamespace(train_lock=None, _trigger_rerender=lambda: events.append("rerender")),
        viser_server=SimpleNamespace(get_clients=lambda: {0: SimpleNamespace(camera=SimpleNamespace(aspect=W / H))}),
        get_camera=lambda h, w: _camera(w, h),
        register_pointer_cb=lambda kind, cb: events.append((kind, cb)),
        unregister_pointer_cb=lambda: events.append("unregister"),
    )
    controls.select_threshold.value = 0.01
    controls.on_select_by_click(controls.select_by_click)
    assert events[0][0] == "click" and controls.select_status.value == ARMED
    events[0][1](_click_on(model, cam, ~LEFT))
    assert events[1:] == ["unregister", "rerender"]  # one-shot, then the view shows the selection
    assert torch.equal(controls.selection(), ~LEFT)  # resolved in the 256-px viewer camera
    assert controls.select_status.value == "150 Gaussians"


def _dense_backprojection(model, cameras) -> torch.Tensor:
    """Reference: dense [N, HW] weight matrices per view, F(u) = W^T f / sum W, fbar = W F / sum W."""
    f = model.gauss_params["features"].detach()
    num, den = torch.zeros_like(f), torch.zeros(f.shape[0])
    for i in range(len(cameras)):
        c = camera_contributions(model, cameras[i : i + 1])
        w = torch.zeros(f.shape[0], c.width * c.height)
        w[c.gaussian_ids, c.pixel_ids] = c.weights
        rendered = (w.T @ f) / w.sum(0).clamp(min=1e-6)[:, None]  # [HW, D]
        num += w @ rendered
        den += w.sum(1)
    return torch.where(den[:, None] > 0, num / den.clamp(min=1e-12)[:, None], f)


def test_backprojected_features_equal_the_dense_reference_and_pull_outliers_in():
    from trace3d_ns.features.backprojection import backproject_features

    model, cam = _two_clusters(), _camera(W, H)
    with torch.no_grad():
        model.gauss_params["means"][299] = torch.tensor([50.0, 50.0, 0.0])  # far outside the view: unseen
        model.gauss_params["features"][0] = torch.tensor([-0.3] + [0.0] * 15)  # a left Gaussian with a right feature
    cameras = cam
    fbar = backproject_features(model, cameras)
    torch.testing.assert_close(fbar, _dense_backprojection(model, cameras), rtol=1e-4, atol=1e-5)
    raw = model.gauss_params["features"].detach()
    assert torch.equal(fbar[299], raw[299])  # no view renders it: keeps its own feature
    assert fbar[0, 0] > 0.1  # traced back, the outlier shows its cluster's feature

    model.selection_cameras = cameras
    assert torch.equal(model.selection_features(), fbar)
    assert model.selection_features() is model.selection_features()  # cached while nothing changes
    with torch.no_grad():
        model.gauss_params["features"].mul_(2.0)
    torch.testing.assert_close(model.selection_features(), 2.0 * fbar)  # recomputed after an update


def test_feature_instance_mode_keeps_the_selection_inside_the_clicked_label():
    model, cam = _two_clusters(), _camera(W, H)
    model.instance_labels = torch.where(LEFT, 7, 3)
    controls = _controls(model)
    controls.select_threshold.value = -1.0  # feature similarity alone takes everything
    controls.select_mode.value = "feature"
    controls.on_click(_click_on(model, cam, LEFT), cam)
    assert bool(controls.selection().all())
    controls.select_mode.value = "feature_instance"
    controls.on_click(_click_on(model, cam, LEFT), cam)
    assert torch.equal(controls.selection(), LEFT)
    controls.select_threshold.value = 0.9  # the slider still applies, within the label
    assert 0 < controls.selection().sum() < 150 and not (controls.selection() & ~LEFT).any()
    model.instance_labels = torch.zeros(0, dtype=torch.long)  # no labels: feature selection
    controls.select_threshold.value = -1.0
    controls.on_click(_click_on(model, cam, LEFT), cam)
    assert bool(controls.selection().all())
