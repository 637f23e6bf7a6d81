"""The CUDA path, held on the CPU: each finding of the review of the GPU branches has a test here
that fails without its fix. Devices are simulated: a tensor that refuses `.numpy()` stands for a
CUDA tensor, gsplat's missing extension is `_C = None`, memory bounds count what is held."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.gaussians import intrinsics, look_at, random_gaussians
from tests.memory import LiveCounter, LiveTensorBytes
from tests.test_method import _camera, _model
from tests.test_selection import _two_cluster_model as _two_clusters

W, H = 64, 48
LEFT = torch.arange(300) < 150


class DeviceOnly(torch.Tensor):
    """A tensor that, like a CUDA tensor, refuses `.numpy()`; `.cpu()` gives a plain host tensor."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.Tensor.cpu and isinstance(out, torch.Tensor):
            return out.as_subclass(torch.Tensor)
        return out


def _cameras(xs, width=W, height=H):
    """nerfstudio Cameras at (x, 0, 3) for x in xs, looking at the origin."""
    from nerfstudio.cameras.cameras import Cameras

    c2ws = []
    for x in xs:
        c2w = torch.linalg.inv(look_at((x, 0.0, 3.0)))
        c2w[:3, 1:3] *= -1  # OpenCV -> nerfstudio's OpenGL convention
        c2ws.append(c2w[:3, :])
    K = intrinsics(width, height)
    n = len(xs)
    return Cameras(
        camera_to_worlds=torch.stack(c2ws), fx=K[0, 0].expand(n, 1), fy=K[1, 1].expand(n, 1),
        cx=K[0, 2].expand(n, 1), cy=K[1, 2].expand(n, 1), width=width, height=height,
    )


def _label_maps(model, cameras):
    """Per camera, [H, W] int32: 1 / 2 where the left / right cluster covers the pixel, else 0."""
    from trace3d_ns.selection import render_subset_alpha

    maps = []
    for v in range(len(cameras)):
        left = render_subset_alpha(model, cameras[v : v + 1], LEFT) > 0.5
        right = render_subset_alpha(model, cameras[v : v + 1], ~LEFT) > 0.5
        maps.append(torch.where(left, 1, torch.where(right, 2, 0)).int())
    return maps


def _pixel_in(label_map, label):
    ys, xs = torch.nonzero(label_map == label, as_tuple=True)
    return int(xs[len(xs) // 2]), int(ys[len(ys) // 2])


# ---- trace3d-prompt: images on the GPU, one view's contributions at a time ------------------------
def test_host_images_copy_device_images_one_at_a_time():
    from trace3d_ns.prompt_cli import HostImages

    rgba = torch.randint(0, 256, (4, 5, 4), dtype=torch.uint8)
    floats = torch.rand(4, 5, 3)
    cached = [{"image": rgba.as_subclass(DeviceOnly)}, {"image": floats.as_subclass(DeviceOnly)}]
    with pytest.raises(TypeError, match="cuda"):
        cached[0]["image"].numpy()  # the simulated device tensor refuses, as CUDA tensors do
    images = HostImages(cached)
    assert len(images) == 2
    first, second = images[0], images[1]
    assert first.dtype == np.uint8 and first.shape == (4, 5, 3)
    np.testing.assert_array_equal(first, rgba[..., :3].numpy())
    np.testing.assert_array_equal(second, (floats * 255).round().to(torch.uint8).numpy())


def test_trace3d_prompt_with_device_images_holds_one_view_of_contributions(monkeypatch, tmp_path):
    import json

    from nerfstudio.utils import eval_utils
    from trace3d_ns import prompt_cli, selection

    model = _two_clusters()
    cameras = _cameras([-0.3, -0.1, 0.1, 0.3, 0.2])
    maps = _label_maps(model, cameras)
    images = [torch.zeros(H, W, 3, dtype=torch.uint8).as_subclass(DeviceOnly) for _ in maps]
    dm = SimpleNamespace(
        train_dataset=SimpleNamespace(cameras=cameras), cached_train=[{"image": im} for im in images],
        train_patch_maps=lambda: maps,
    )
    pipeline = SimpleNamespace(model=model, datamanager=dm)
    monkeypatch.setattr(eval_utils, "eval_setup", lambda *args, **kwargs: (None, pipeline, None, 0))
    counter = LiveCounter(selection.camera_contributions)
    monkeypatch.setattr(selection, "camera_contributions", counter)
    config = tmp_path / "config.yml"
    config.write_text("")
    x, y = _pixel_in(maps[0], 1)
    out = tmp_path / "out"
    assert prompt_cli.main(["--load-config", str(config), "--view", "0", "--points", f"{x},{y}", "--output-dir", str(out)]) == 0
    from trace3d_ns.export.ply import read_ply

    summary = json.loads((out / "prompt.json").read_text())
    assert 100 <= summary["selected_gaussians"] <= 150
    assert (read_ply(out / "selection.ply")["x"] < 0).all()  # only the left cluster
    assert counter.made >= len(cameras) and counter.peak <= 2  # streamed: not one per view


# ---- trace3d-eval: one test view's contributions at a time -----------------------------------------
def test_evaluation_holds_one_test_view_of_contributions(monkeypatch):
    from trace3d_ns.evaluation import harness
    from trace3d_ns.evaluation.ground_truth import View

    model = _two_clusters()
    cameras = _cameras([-0.3, -0.1, 0.1, 0.3, 0.0])
    maps = _label_maps(model, cameras)
    views = [
        View(f"v{i}", cameras[i : i + 1], maps[i].numpy().astype(np.int64), harness.render_subset_rgb(model, cameras[i : i + 1], torch.ones(300, dtype=torch.bool)))
        for i in range(len(cameras))
    ]
    counter = LiveCounter(harness.camera_contributions)
    monkeypatch.setattr(harness, "camera_contributions", counter)
    result = harness.evaluate(model, views[:1], views[1:], has_objects=True, settings=harness.Settings())
    assert counter.made == 4 and counter.peak == 1  # each test view once, one at a time
    for o in result["objects"].values():
        assert o["num_selected"] == 150 and len(o["views"]) == 4 and o["iou_visible"] > 0.9
    assert result["foreground"]["miou"] > 0.9


# ---- back-projection: chunked pair temporaries ------------------------------------------------------
def test_backprojection_temporaries_are_bounded_by_the_chunk(monkeypatch):
    from trace3d_ns.features import backprojection
    from trace3d_ns.selection import camera_contributions

    model = _two_clusters()
    with torch.no_grad():
        model.gauss_params["scales"].fill_(-1.5)  # large Gaussians: many pairs per pixel
        model.gauss_params["opacities"].fill_(-2.0)
        model.gauss_params["features"].normal_(generator=torch.Generator().manual_seed(0))
    cameras = _cameras([-0.2, 0.2])
    pairs = {i: camera_contributions(model, cameras[i : i + 1]) for i in range(2)}  # made before counting
    num_pairs = max(len(c) for c in pairs.values())
    n, d = model.gauss_params["features"].shape
    assert num_pairs > 20 * max(n, W * H)
    by_x = lambda model, camera: pairs[int(camera.camera_to_worlds[0, 0, 3].item() > 0)]  # noqa: E731
    monkeypatch.setattr(backprojection, "camera_contributions", by_x)

    def peak(chunk):
        with LiveTensorBytes() as mem:
            out = backprojection.backproject_features(model, cameras, pair_chunk=chunk)
        return mem.peak, out

    chunk = 256
    peak_chunked, fbar = peak(chunk)
    peak_whole, reference = peak(num_pairs)
    torch.testing.assert_close(fbar, reference, rtol=1e-5, atol=1e-6)
    accumulators = 4 * (3 * n * d + n + W * H * d + W * H)  # num, den, output; rendered, alpha
    assert peak_chunked <= accumulators + 4 * (3 * chunk * d + 2 * chunk) + 4096
    assert peak_whole >= 2 * 4 * num_pairs * d  # what chunking avoids: [pairs, D] temporaries

    # traced selection streams the same views: inside, total, the share; one view's F, alpha, norms
    # and prediction; the chunk's temporaries
    query = model.gauss_params["features"][0].detach()
    with LiveTensorBytes() as mem:
        share = backprojection.traced_match_share(model, cameras, query, 0.7, pair_chunk=chunk)
    assert (share >= 0).any()
    bound = 4 * (4 * n + W * H * d + 4 * W * H) + 4 * (3 * chunk * d + 3 * chunk) + 4096
    assert mem.peak <= bound, (mem.peak, bound)


# ---- tracing: weights above float16's range ----------------------------------------------------------
def test_weights_above_float16_range_stay_finite_through_merging():
    from trace3d_ns.git.merging import MergeConfig, consistent_instances, refine_maps
    from trace3d_ns.git.tracing import TraceAccumulator
    from trace3d_ns.rendering import Contributions

    objects = [list(range(0, 20)), list(range(20, 40)), list(range(40, 60))]
    big = 70000  # pixels of object 0's patch that Gaussian 0 alone covers in view 0 (> 65504)
    acc, maps = TraceAccumulator(60, 6), []
    for v in range(6):
        gids = [g for group in objects for g in group]
        pixels = [k + 1 for k, group in enumerate(objects) for _ in group]
        patch_map = torch.arange(4, dtype=torch.int32)
        if v == 0:
            gids += [0] * big
            pixels += list(range(4, 4 + big))
            patch_map = torch.cat([patch_map, torch.ones(big, dtype=torch.int32)])
        contrib = Contributions(torch.tensor(gids), torch.tensor(pixels), torch.ones(len(gids)), patch_map.numel(), 1)
        acc.add_view(v, contrib, patch_map[None])
        maps.append(patch_map[None])
    traces = acc.build()
    assert torch.isfinite(traces.obs_weight.float()).all()
    assert traces.weights(0)[0].item() == pytest.approx(big + 1, rel=2.0**-8)
    result = consistent_instances(traces, maps, MergeConfig(min_traced=3))
    assert torch.isfinite(result.gaussian_confidence).all()
    assert all(torch.isfinite(p).all() for p in result.patch_purity)
    labels = result.gaussian_labels
    for group in objects:  # every Gaussian, the huge one included, carries its object's id
        assert len(set(labels[group].tolist())) == 1 and labels[group[0]] > 0
    assert len(set(labels.tolist())) == 3
    assert result.patch_purity[0][1] == pytest.approx(1.0)
    refined = refine_maps(result, maps, lambda v: None, min_purity=0.9, fill_unmasked=False)  # all pure: no render
    assert torch.equal(refined[0][0, 4:], torch.full((big,), int(labels[0]), dtype=torch.int32))


# ---- tracing: the full-resolution camera ------------------------------------------------------------
def test_tracing_renders_the_full_resolution_camera_while_training_downscaled():
    from trace3d_ns.git.tracing import view_contributions
    from trace3d_ns.selection import camera_contributions

    model = _two_clusters()
    model.config.num_downscales, model.config.resolution_schedule = 2, 10**6  # factor 4 at step 0
    cameras = _cameras([0.0, 0.2], width=203, height=151)  # not divisible by 4: floored sizes
    model.train()
    assert model._get_downscale_factor() == 4 and model.camera_matrices(cameras[0:1])[2] == 50
    traced = view_contributions(model, cameras, 1, (151, 203))
    model.eval()
    exact = camera_contributions(model, cameras[1:2])
    assert torch.equal(traced.pixel_ids, exact.pixel_ids) and torch.equal(traced.gaussian_ids, exact.gaussian_ids)
    torch.testing.assert_close(traced.weights, exact.weights)


def test_accumulated_traces_stay_within_twice_the_store():
    from trace3d_ns.git.surface_gaussians import surface_scene
    from trace3d_ns.git.tracing import TraceAccumulator
    from trace3d_ns.rendering import contributions
    from trace3d_ns.scene.generate import SceneSpec

    s = surface_scene(SceneSpec(num_objects=3, num_views=8, image_size=48, seed=1))
    views = [
        contributions(s.means, s.quats, s.scales, s.opacities, s.viewmats[v], s.Ks[v], s.width, s.height)
        for v in range(8)
    ]
    patches = [s.gt_instances[v].int() + 1 for v in range(8)]
    with LiveTensorBytes() as mem:
        acc = TraceAccumulator(s.num_gaussians, 8)
        for v in range(8):
            acc.add_view(v, views[v], patches[v])
        held = mem.live
        store = acc.build()
    per_view = max(len(c) for c in views) * (8 + 8 + 4)  # a view's pairs as int64 ids and float32 weights
    assert held <= 2 * store.nbytes()
    assert mem.peak <= 3 * store.nbytes() + 8 * per_view


def test_packed_views_as_ids_or_bit_masks_build_the_same_store():
    from trace3d_ns.git.tracing import TraceAccumulator, TraceConfig, _pack, trace_view
    from trace3d_ns.rendering import Contributions

    n = 1000
    g = torch.Generator().manual_seed(0)
    sparse = torch.tensor([5, 17, 17, 900])  # 3 of 1000 Gaussians: kept as int32 ids
    dense = torch.randperm(n, generator=g)[:600].repeat_interleave(2)  # 600 of 1000: a bit mask
    config = TraceConfig(min_weight=0.0)
    expected = {}
    acc = TraceAccumulator(n, 2, config)
    for v, gids in enumerate([sparse, dense]):
        labels = torch.randint(0, 3, gids.shape, generator=g)
        weights = torch.rand(gids.shape, generator=g)
        contrib = Contributions(gids, labels, weights, 3, 1)
        trace = trace_view(gids, labels, weights, 3, config)
        assert _pack(trace, 3, n).bitmask == (v == 1)
        expected[v] = torch.zeros(n).index_put_((trace.gaussian,), trace.weight)
        acc.add_view(v, contrib, torch.arange(3, dtype=torch.int32)[None])
    store = acc.build()
    for v in range(2):
        torch.testing.assert_close(store.weights(v), expected[v].bfloat16().float())
    key = store.obs_gaussian() * 2 + store.obs_view.long()
    assert torch.all(key[1:] > key[:-1])  # sorted by (Gaussian, view)


def test_saturation_pass_in_pixel_blocks_equals_one_pass():
    from trace3d_ns.cuda.tiles import _saturation_and_transmittance

    g = torch.Generator().manual_seed(0)
    pix = torch.sort(torch.randint(0, 50, (2000,), generator=g)).values.int()  # ~40 pairs per pixel
    alpha = 0.5 * torch.rand(2000, generator=g)
    t0 = 0.1 + 0.9 * torch.rand(50, generator=g)
    whole = _saturation_and_transmittance(alpha, pix, t0, chunk=10**9)
    blocks = _saturation_and_transmittance(alpha, pix, t0, chunk=37)  # cut mid-pixel: moved to pixel starts
    assert torch.equal(blocks[0], whole[0]) and 0 < int(whole[0].sum()) < 2000  # some pixels saturate
    torch.testing.assert_close(blocks[1], whole[1])


# ---- selection: rasterize mode --------------------------------------------------------------------
def test_subset_alpha_follows_the_antialiased_mode():
    from trace3d_ns.selection import render_subset_alpha

    model = _two_clusters()
    model.config.rasterize_mode = "antialiased"
    cam = _camera(W, H)
    full = model.get_outputs_for_camera(cam)["accumulation"][..., 0]
    alone = render_subset_alpha(model, cam, torch.ones(300, dtype=torch.bool))
    torch.testing.assert_close(alone, full, atol=1e-5, rtol=1e-5)
    model.config.rasterize_mode = "classic"
    assert (render_subset_alpha(model, cam, torch.ones(300, dtype=torch.bool)) - full).abs().max() > 1e-3


# ---- selection features: cached across optimizer steps while training ----------------------------
def test_selection_features_are_not_recomputed_every_optimizer_step(monkeypatch):
    from nerfstudio.engine.optimizers import Optimizers
    from trace3d_ns.config import trace3d_trainer_config
    from trace3d_ns.features import backprojection

    model = _two_clusters()
    model.selection_cameras = _cameras([0.0])
    counter = LiveCounter(backprojection.backproject_features)
    monkeypatch.setattr(backprojection, "backproject_features", counter)
    optimizers = Optimizers(trace3d_trainer_config().optimizers, model.get_param_groups())
    model.config.selection_refresh_steps = 100
    first = None
    for step in range(5):  # training: an optimizer step, then a viewer frame after a click
        model.step_cb(optimizers, step)
        model.train()
        model.get_outputs(_camera(W, H))["rgb"].mean().backward()
        optimizers.optimizer_step_all()
        optimizers.zero_grad_all()
        model.eval()
        first = model.selection_features() if first is None else first
        assert model.selection_features() is first
    assert counter.made == 1
    model.step_cb(optimizers, 100)  # the next block of steps
    model.selection_features()
    assert counter.made == 2

    del model.optimizers  # outside training: any change of the Gaussians recomputes
    model.selection_features()
    made = counter.made
    model.selection_features()
    assert counter.made == made
    with torch.no_grad():
        model.gauss_params["means"].add_(0.01)
    model.selection_features()
    assert counter.made == made + 1


# ---- viewer: output order, instance only when shown ---------------------------------------------------
def _viewer(output_render="rgb", split=False, split_output_render="depth"):
    panel = SimpleNamespace(output_render=output_render, split=split, split_output_render=split_output_render)
    return SimpleNamespace(control_panel=panel)


def test_viewer_outputs_start_with_rgb_then_the_trace3d_outputs():
    model = _two_clusters()
    cam = _camera(W, H)
    controls = model.viewer_controls
    x, y = _pixel_in(_label_maps(model, _cameras([0.0]))[0], 1)
    controls.on_click(SimpleNamespace(screen_pos=((x + 0.5) / W, (y + 0.5) / H)), cam)
    keys = list(model.get_outputs_for_camera(cam))
    assert keys[:4] == ["rgb", "feature_pca", "instance", "selection"]
    assert keys[-1] == "feature" and set(keys[4:]) == {"depth", "accumulation", "background", "feature"}
    controls.on_clear()
    keys = list(model.get_outputs_for_camera(cam))
    assert keys[:3] == ["rgb", "feature_pca", "instance"] and "selection" not in keys


def test_instance_output_is_computed_only_when_displayed(monkeypatch):
    from trace3d_ns import viewer_controls

    model = _two_clusters()
    cam = _camera(W, H)
    counter = LiveCounter(viewer_controls.top_instance_ids)
    monkeypatch.setattr(viewer_controls, "top_instance_ids", counter)
    controls = model.viewer_controls
    headless = model.get_outputs_for_camera(cam)["instance"]
    assert counter.made == 1  # no viewer: every output is computed
    controls.viewer_control.viewer = _viewer("rgb")
    out = model.get_outputs_for_camera(cam)
    assert counter.made == 1 and "instance" in out and out["instance"].shape == (H, W, 3)  # offered, not computed
    controls.viewer_control.viewer = _viewer("instance")
    torch.testing.assert_close(model.get_outputs_for_camera(cam)["instance"], headless)
    controls.viewer_control.viewer = _viewer("rgb", split=True, split_output_render="instance")
    model.get_outputs_for_camera(cam)
    assert counter.made == 3


# ---- feature pass: the contrastive gradients reach densification's means2d on every backend ----------
@pytest.mark.parametrize("render_mode", ["RGB", "RGB+ED"])
@pytest.mark.parametrize("grad_to_geometry", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_gsplat_feature_pass_gradients_equal_the_torch_backend(grad_to_geometry, render_mode, sparse):
    from trace3d_ns.cuda.rasterization import rasterization
    from trace3d_ns.cuda.sh import spherical_harmonics
    from trace3d_ns.rendering import _gsplat_with_extra, rasterize_with_extra

    view, K = look_at((0.2, -0.1, 3.0)), intrinsics(W, H)
    g = torch.Generator().manual_seed(3)
    base = [*random_gaussians(200, seed=5, sh_degree=2), torch.randn(200, 16, generator=g)]
    weights = [torch.rand(H, W, c, generator=g) for c in (3, 16, 1)]
    wanted = (torch.rand(1, H, W, generator=g) < 0.1) if sparse else None  # features needed only there

    def run(fn):
        means, quats, scales, opac, sh, feats = [t.clone().requires_grad_(True) for t in base]
        render, alpha, meta, extra = fn(
            means, quats, scales, opac, sh, view[None], K[None], W, H, extra_colors=feats,
            extra_grad_to_geometry=grad_to_geometry, sh_degree=2, render_mode=render_mode, absgrad=True,
            extra_pixels=wanted,
        )
        if sparse:
            assert (extra[~wanted] == 0).all() and (extra[wanted] != 0).any()
        meta["means2d"].retain_grad()
        loss = (render[0, ..., :3] * weights[0]).sum() + (extra[0] * weights[1]).sum() + (alpha[0] * weights[2]).sum()
        if render_mode == "RGB+ED":
            loss = loss + 0.1 * (render[0, ..., 3:] * weights[2]).sum()
        loss.backward()
        return render, alpha, extra, meta["means2d"].grad, meta["means2d"].absgrad, means.grad, feats.grad

    def gsplat_like(*args, **kwargs):
        return _gsplat_with_extra(rasterization, spherical_harmonics, *args[:9], kwargs.pop("extra_colors"),
                                  kwargs.pop("extra_grad_to_geometry"), **kwargs)

    cpu, cuda_branch = run(rasterize_with_extra), run(gsplat_like)
    names = ["render", "alpha", "extra", "means2d.grad", "means2d.absgrad", "means.grad", "features.grad"]
    for name, a, b in zip(names, cpu, cuda_branch):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        # float32 sums in another order: entries that cancel to ~0 keep an error relative to the
        # tensor's largest entry (~3e-7 of it measured), not to themselves
        atol = 1e-5 + 1e-6 * float(b.detach().abs().max())
        torch.testing.assert_close(b, a, rtol=1e-4, atol=atol, msg=name)


# ---- start-up checks -----------------------------------------------------------------------------------
def _fake_gsplat_backend(monkeypatch, backend):
    """Stand-in for `gsplat.cuda._backend` (importing the real one starts gsplat's nvcc build)."""
    import sys

    import gsplat.cuda

    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", backend)  # None: importing it raises
    if backend is None:
        monkeypatch.delattr(gsplat.cuda, "_backend", raising=False)
    else:
        monkeypatch.setattr(gsplat.cuda, "_backend", backend, raising=False)


def test_missing_gsplat_extension_is_a_clear_error_at_model_start(monkeypatch):
    from trace3d_ns.device import GsplatUnavailableError, require_gsplat_cuda

    _fake_gsplat_backend(monkeypatch, SimpleNamespace(_C=None))  # no CUDA toolkit: gsplat leaves _C None
    with pytest.raises(GsplatUnavailableError, match="nvcc"):
        require_gsplat_cuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but no extension
    with pytest.raises(GsplatUnavailableError, match="--machine.device-type cpu"):
        _model_on("cuda")
    _fake_gsplat_backend(monkeypatch, None)  # the import (gsplat's JIT build) raises
    with pytest.raises(GsplatUnavailableError, match="could not build"):
        require_gsplat_cuda()
    _fake_gsplat_backend(monkeypatch, SimpleNamespace(_C=object()))  # built: the check passes
    require_gsplat_cuda()


def _model_on(device):
    from nerfstudio.data.scene_box import SceneBox
    from trace3d_ns.model import Trace3DModelConfig

    box = SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]]))
    return Trace3DModelConfig(num_random=10).setup(scene_box=box, num_train_data=1, seed_points=None, device=device)


def _ns_train_config(*args):
    import tyro

    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    return tyro.cli(AnnotatedBaseConfigUnion, args=["trace3d", *args])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_ns_train_without_gpu_falls_back_to_the_cpu_with_one_warning(tmp_path):
    from trace3d_ns.device import DeviceFallbackWarning

    config = _ns_train_config("--data", str(tmp_path), "--output-dir", str(tmp_path / "out"))
    assert config.machine.device_type == "auto"
    with pytest.warns(DeviceFallbackWarning, match="--machine.device-type cpu") as record:
        config.set_timestamp()
        config.save_config()  # what ns-train does before it launches
    assert config.machine.device_type == "cpu"
    assert len([w for w in record if issubclass(w.category, DeviceFallbackWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeviceFallbackWarning)
        trainer = config.setup(local_rank=0, world_size=1)  # resolved once: no second warning
    assert trainer.device == "cpu"
    saved = (config.get_base_dir() / "config.yml").read_text()
    assert "device_type: cpu" in saved


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_ns_train_with_explicit_cuda_and_no_gpu_keeps_the_clear_error(tmp_path):
    from trace3d_ns.device import DeviceFallbackWarning, DeviceUnavailableError

    config = _ns_train_config("--data", str(tmp_path), "--machine.device-type", "cuda", "--output-dir", str(tmp_path / "o"))
    config.set_timestamp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeviceFallbackWarning)  # no fallback warning: cuda was asked for
        trainer = config.setup(local_rank=0, world_size=1)
    with pytest.raises(DeviceUnavailableError, match="--machine.device-type cpu"):
        trainer.setup()



# ---- trace3d-bench scale ----------------------------------------------------------------------------
def test_scale_benchmark_reports_memory_and_time_on_a_tiny_scene():
    from trace3d_ns.benchmarks.scale import make_scene, patch_map, run_scale_benchmark
    from trace3d_ns.git.tracing import TraceConfig
    from trace3d_ns.rendering import resolve_backend

    scene = make_scene(5000, 3, 48)
    assert scene.num_gaussians == 5000 and scene.viewmats.shape == (3, 4, 4)
    patches = patch_map(scene, 0)
    assert patches.shape == (48, 48) and int(patches.max()) >= 10  # instances cut by the 7 x 7 grid
    assert int(patches[0, 0]) == 0 and int(patches[24, 24]) > 0  # sky in the corner, the scene in the middle
    result = run_scale_benchmark(num_gaussians=5000, num_views=3, size=48, threads=1)
    assert result["store_bytes"] > 0 and result["observations"] > 0 and result["trace_s"] > 0
    assert result["peak_rss_bytes"] >= result["baseline_rss_bytes"] > 0
    assert result["peak_over_store"] == pytest.approx(
        (result["peak_rss_bytes"] - result["baseline_rss_bytes"]) / result["store_bytes"]
    )
    # it traces as trace_model does on the CPU: the compiled kernel's per-patch sums, which build the
    # same store as the torch reference's listed pairs summed per patch
    assert result["backend"] == resolve_backend("auto", torch.device("cpu")) and result["per_view"] == "per-patch sums"
    reference = run_scale_benchmark(num_gaussians=5000, num_views=3, size=48, threads=1, backend="torch")
    assert reference["backend"] == "torch"
    assert (reference["observations"], reference["entries"]) == (result["observations"], result["entries"])
    counted = run_scale_benchmark(num_gaussians=5000, num_views=3, size=48, threads=1, config=TraceConfig(mode="count"))
    assert counted["per_view"] == "pairs" and counted["observations"] > 0


def test_freed_host_memory_goes_back_to_the_os_between_views():
    import platform

    from trace3d_ns.device import release_freed_host_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    big = np.ones(16 << 20, np.uint8)
    del big  # freeing a mmapped block raises glibc's mmap threshold: the next 8 MB arrays come from the heap
    blocks = [np.ones(8 << 20, np.uint8) for _ in range(20)]
    keep = blocks[-1]  # the heap's top stays in use: only trimming inside the heap gives pages back
    del blocks
    before = rss()
    assert release_freed_host_memory()
    assert before - rss() > 100 << 20  # most of the 152 MB freed
    assert keep[0] == 1


def test_kept_heap_memory_is_reused_without_page_faults():
    import platform
    import resource

    from trace3d_ns.device import keep_freed_host_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")

    def faults_of_one_block() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = np.ones(64 << 20, np.uint8)  # over glibc's largest dynamic mmap threshold (32 MB)
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert keep_freed_host_memory()
    faults_of_one_block()  # the heap grows once
    assert faults_of_one_block() < 100  # a freshly mapped one: 540 faults here (huge pages), 16k without them
