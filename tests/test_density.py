"""GIT-guided density control: split/prune bookkeeping (parameters, Adam moments, state), the
children's sampling, the cycle policy, and full cycles on a tiny scene's training pipeline."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trace3d_ns.git.density import GitDensityControl, plan_cycle, prune_gaussians, split_gaussians


def _gaussians(n: int, seed: int = 0):
    """Parameters like the model's, Adam optimizers with non-zero moments, and a strategy state."""
    g = torch.Generator().manual_seed(seed)
    params = {
        "means": torch.randn(n, 3, generator=g),
        "scales": torch.log(0.05 + 0.2 * torch.rand(n, 3, generator=g)),
        "quats": torch.randn(n, 4, generator=g),
        "features_dc": torch.randn(n, 3, generator=g),
        "features_rest": torch.randn(n, 3, 3, generator=g),
        "opacities": torch.randn(n, 1, generator=g),
    }
    params = {k: torch.nn.Parameter(v) for k, v in params.items()}
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    for _ in range(2):
        loss = sum((p * torch.randn(p.shape, generator=g)).sum() for p in params.values())
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad()
    state = {
        "grad2d": torch.rand(n, generator=g),
        "count": torch.arange(n, dtype=torch.float32),
        "radii": torch.rand(n, generator=g),
        "not_per_gaussian": torch.arange(n + 1),
        "scene_scale": 1.0,
    }
    return params, optimizers, state


def _moments(optimizers, name):
    opt = optimizers[name]
    p = opt.param_groups[0]["params"][0]
    return p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]


def test_split_bookkeeping_params_moments_and_state():
    n = 10
    params, optimizers, state = _gaussians(n)
    before = {k: v.detach().clone() for k, v in params.items()}
    moments = {k: [m.clone() for m in _moments(optimizers, k)[1:]] for k in params}
    old_state = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[1, 4, 7]] = True
    rest, sel = torch.where(~mask)[0], torch.where(mask)[0]

    index = split_gaussians(params, optimizers, state, mask, torch.Generator().manual_seed(1))

    assert torch.equal(index, torch.cat([rest, sel, sel]))
    m = n + 3
    for name, p in params.items():
        assert p.shape == (m, *before[name].shape[1:])
        opt_p, exp_avg, exp_avg_sq = _moments(optimizers, name)
        assert opt_p is p  # the optimizer now updates the new parameter
        assert exp_avg.shape == exp_avg_sq.shape == p.shape
        torch.testing.assert_close(exp_avg[:7], moments[name][0][rest], rtol=0, atol=0)  # kept rows untouched
        torch.testing.assert_close(exp_avg_sq[:7], moments[name][1][rest], rtol=0, atol=0)
        assert not exp_avg[7:].any() and not exp_avg_sq[7:].any()  # children start fresh
        torch.testing.assert_close(p[:7], before[name][rest], rtol=0, atol=0)
        if name not in ("means", "scales"):  # copied attributes
            torch.testing.assert_close(p[7:], before[name][index[7:]], rtol=0, atol=0)
    torch.testing.assert_close(params["scales"][7:].exp(), before["scales"][index[7:]].exp() / 2)
    assert not torch.allclose(params["means"][7:10], params["means"][10:])  # two different samples
    for key in ("grad2d", "count", "radii"):
        torch.testing.assert_close(state[key], old_state[key][index], rtol=0, atol=0)
    assert torch.equal(state["not_per_gaussian"], old_state["not_per_gaussian"])
    assert state["scene_scale"] == 1.0
    # Adam still steps on the new parameters
    params["means"].sum().backward()
    optimizers["means"].step()


def test_split_children_sample_the_parents_gaussian():
    """Children of one anisotropic, rotated parent (repeated rows): Mahalanobis distances under
    the parent's covariance are chi(3)-distributed, so d < 3 for ~97% and E[d^2] = 3."""
    from gsplat.utils import normalized_quat_to_rotmat

    n = 3000
    params, optimizers, state = _gaussians(n)
    mean, quat, scale = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.9, 0.2, -0.3, 0.4]), torch.tensor([0.5, 0.05, 0.2])
    with torch.no_grad():
        params["means"][:] = mean
        params["quats"][:] = 2.5 * quat  # unnormalised on purpose
        params["scales"][:] = scale.log()
    index = split_gaussians(params, optimizers, state, torch.ones(n, dtype=torch.bool), torch.Generator().manual_seed(2))

    assert index.shape == (2 * n,)
    R = normalized_quat_to_rotmat(torch.nn.functional.normalize(quat, dim=0))
    cov = R @ torch.diag(scale**2) @ R.T
    d = params["means"].detach() - mean  # [2n, 3]
    d2 = (d @ torch.linalg.inv(cov) * d).sum(-1)  # [2n] squared Mahalanobis distances
    assert (d2.sqrt() < 3).float().mean() > 0.95
    assert abs(d2.mean().item() - 3.0) < 0.15
    torch.testing.assert_close(params["scales"].detach().exp(), (scale / 2).expand(2 * n, 3))


def test_prune_bookkeeping():
    n = 8
    params, optimizers, state = _gaussians(n)
    before = {k: v.detach().clone() for k, v in params.items()}
    exp_avg = {k: _moments(optimizers, k)[1].clone() for k in params}
    count = state["count"].clone()
    mask = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)

    keep = prune_gaussians(params, optimizers, state, mask)

    assert torch.equal(keep, torch.tensor([0, 2, 3, 6, 7]))
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), before[name][keep], rtol=0, atol=0)
        opt_p, avg, avg_sq = _moments(optimizers, name)
        assert opt_p is p and avg_sq.shape == p.shape
        torch.testing.assert_close(avg, exp_avg[name][keep], rtol=0, atol=0)
    assert torch.equal(state["count"], count[keep]) and state["not_per_gaussian"].shape == (n + 1,)


def test_cycle_prunes_only_still_ambiguous_children():
    ambiguous = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    split_last = torch.tensor([1, 0, 1, 0, 0, 0], dtype=torch.bool)
    seen = torch.tensor([3, 2, 1, 4, 2, 0])

    prune, split = plan_cycle(ambiguous, seen, split_last, last=False, prune_unseen=False)
    assert prune.tolist() == [1, 0, 0, 0, 0, 0]  # a child still ambiguous; not the resolved child 2
    assert split.tolist() == [0, 1, 0, 0, 1, 0]  # ambiguous, not split before: split first

    prune, split = plan_cycle(ambiguous, seen, None, last=False, prune_unseen=False)
    assert not prune.any() and torch.equal(split, ambiguous)  # the first cycle only splits

    prune, split = plan_cycle(ambiguous, seen, split_last, last=True, prune_unseen=True)
    assert prune.tolist() == [1, 0, 0, 0, 0, 1] and not split.any()  # the last one only prunes


def test_cycle_splits_hidden_gaussians_and_keeps_hidden_children():
    ambiguous = torch.tensor([1, 0, 0, 0, 0], dtype=torch.bool)
    hidden = torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool)
    split_last = torch.tensor([0, 0, 1, 0, 1], dtype=torch.bool)
    seen = torch.tensor([3, 2, 1, 4, 0])
    prune, split = plan_cycle(ambiguous, seen, split_last, last=False, prune_unseen=True, hidden=hidden)
    assert prune.tolist() == [0, 0, 0, 0, 1]  # a hidden child is split again, unless no view sees it
    assert split.tolist() == [1, 1, 1, 0, 0]
    prune, split = plan_cycle(ambiguous, seen, split_last, last=True, prune_unseen=True, hidden=hidden)
    assert not split.any()


def test_schedule_starts_after_splatfacto_densification():
    control = GitDensityControl(cycles=3, start_step=2000, every=500)
    assert control.schedule(stop_split_at=2000) == [2000, 2500, 3000]
    with pytest.raises(ValueError, match="stop-split-at"):
        control.schedule(stop_split_at=2500)
    assert GitDensityControl(cycles=0, start_step=0).schedule(stop_split_at=15000) == []
    assert control.cycle_at(3000) == 2  # the last cycle, also after resuming a run
    with pytest.raises(ValueError, match="no density control cycle"):
        control.cycle_at(2250)


# ---- full cycles on a tiny scene ----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny scene's pipeline after one training step (DefaultStrategy's state is [N])."""
    from nerfstudio.engine.optimizers import Optimizers
    from trace3d_ns.config import trace3d_trainer_config
    from trace3d_ns.scene.generate import SceneSpec, generate_scene

    root = tmp_path_factory.mktemp("density")
    scene = generate_scene(root / "scene", SceneSpec(num_objects=3, num_views=10, image_size=48, num_points=2000, sam_like_masks=True))
    config = trace3d_trainer_config()
    config.pipeline.datamanager.dataparser.data = Path(scene)
    config.pipeline.datamanager.mask_source = "folder"
    config.pipeline.datamanager.folder.directory = Path("sam_masks")
    config.pipeline.model.num_downscales = 0
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    optimizers = Optimizers(config.optimizers, pipeline.get_param_groups())
    _train_step(pipeline, optimizers, step=1)
    return root, config, pipeline, optimizers


def _train_step(pipeline, optimizers, step: int) -> None:
    model = pipeline.model
    model.train()
    model.step_cb(optimizers, step)
    optimizers.zero_grad_all()
    _, loss_dict, _ = pipeline.get_train_loss_dict(step)
    sum(loss_dict.values()).backward()
    optimizers.optimizer_step_all()
    model.step_post_backward(step)  # DefaultStrategy updates grad2d / count / radii: they must be [N]


def _check_consistent(model) -> None:
    n = model.num_points
    assert all(p.shape[0] == n for p in model.gauss_params.values())
    assert model.instance_labels.shape == model.instance_confidence.shape == (n,)
    assert model.instance_traces is not None and model.instance_traces.num_gaussians == n
    assert model.instance_traces.offsets.shape == (n + 1,)
    for key in ("grad2d", "count", "radii"):
        assert model.strategy_state[key].shape == (n,)


def test_cycles_on_a_training_pipeline(trained):
    _, _, pipeline, optimizers = trained
    model = pipeline.model
    control = GitDensityControl(cycles=3, start_step=10, every=2)  # prune_unseen by default
    assert control.prune_unseen
    state = control.initialize_state()

    first = control.run_cycle(pipeline, state, step=10)
    # no children yet: only the Gaussians no view sees (weight >= min_weight) are pruned
    assert first.num_split > 0 and first.num_children == 0
    assert first.num_pruned == first.num_pruned_unseen == first.num_before - first.num_seen > 0
    assert first.num_after == model.num_points == first.num_before - first.num_pruned + first.num_split
    _check_consistent(model)
    n, k = model.num_points, first.num_split
    children = model.density_children
    assert children.sum() == 2 * k and children[n - 2 * k :].all()
    assert torch.equal(model.instance_labels[n - 2 * k : n - k], model.instance_labels[n - k :])  # both children
    traces = model.instance_traces
    torch.testing.assert_close(traces.index_select(torch.arange(n - 2 * k, n - k)).obs_weight,
                               traces.index_select(torch.arange(n - k, n)).obs_weight)  # inherit their parent
    _train_step(pipeline, optimizers, step=11)  # forward + backward + Adam + DefaultStrategy state update

    second = control.run_cycle(pipeline, state, step=12)
    assert second.num_children == 2 * k
    # still-ambiguous children and unseen Gaussians (an ambiguous Gaussian is seen: disjoint)
    assert second.num_pruned == second.num_ambiguous_children + second.num_pruned_unseen
    assert second.num_after == second.num_before - second.num_pruned + second.num_split
    _check_consistent(model)
    _train_step(pipeline, optimizers, step=13)

    last = control.run_cycle(pipeline, state, step=14)
    assert last.num_split == 0 and last.num_after == last.num_before - last.num_pruned
    assert not model.density_children.any()
    _check_consistent(model)
    _train_step(pipeline, optimizers, step=15)
    assert all(torch.isfinite(p).all() for p in model.gauss_params.values())


def test_a_cycle_with_split_hidden_on_a_training_pipeline(trained):
    _, _, pipeline, optimizers = trained
    model = pipeline.model
    control = GitDensityControl(cycles=2, start_step=20, every=2, split_hidden=True)
    state = control.initialize_state()
    stats = control.run_cycle(pipeline, state, step=20)
    assert stats.num_hidden > 0
    # the split set is the ambiguous and hidden ones, minus those pruned as unseen
    assert stats.num_ambiguous <= stats.num_split + stats.num_pruned <= stats.num_ambiguous + stats.num_hidden + stats.num_pruned
    assert stats.num_after == stats.num_before - stats.num_pruned + stats.num_split
    _check_consistent(model)
    _train_step(pipeline, optimizers, step=21)
    control.run_cycle(pipeline, state, step=22)
    _check_consistent(model)


def _save_run(root: Path, config, pipeline) -> Path:
    """config.yml and a checkpoint like ns-train writes them."""
    config.output_dir = root / "outputs"
    config.experiment_name, config.timestamp = "density", "run"
    config.save_config()
    ckpt_dir = config.get_checkpoint_dir()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 15, "pipeline": pipeline.state_dict()}, ckpt_dir / "step-000000015.ckpt")
    return config.get_base_dir() / "config.yml"


def test_checkpoint_after_density_control_loads(trained):
    from nerfstudio.utils.eval_utils import eval_setup

    root, config, pipeline, _ = trained
    n = pipeline.model.num_points
    children = torch.arange(n) % 3 == 0  # as if a cycle had just split: the next one must see them
    pipeline.model.density_children = children
    config_path = _save_run(root, config, pipeline)
    _, loaded, _, step = eval_setup(config_path, test_mode="test")  # what ns-viewer does
    model = loaded.model
    assert step == 15 and model.num_points == n
    torch.testing.assert_close(model.means, pipeline.model.means)
    assert torch.equal(model.instance_labels.cpu(), pipeline.model.instance_labels.cpu())
    assert torch.equal(model.density_children.cpu(), children)
    older = {k: v for k, v in pipeline.model.state_dict().items() if k != "density_children"}
    model.load_state_dict(older)  # a checkpoint from before the buffer existed
    assert model.density_children.numel() == 0 and model.num_points == n
    camera = loaded.datamanager.eval_dataset.cameras[0:1]
    with torch.no_grad():
        outputs = model.get_outputs_for_camera(camera)
    assert outputs["rgb"].shape[-1] == 3 and torch.isfinite(outputs["rgb"]).all()


@pytest.mark.slow
def test_ns_export_loads_a_checkpoint_after_density_control(trained):
    from plyfile import PlyData

    root, config, pipeline, _ = trained
    config_path = _save_run(root, config, pipeline)
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ns-export"), "gaussian-splat", "--load-config", str(config_path),
         "--output-dir", str(root / "export")],
        capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    opacities = pipeline.model.opacities.detach()[:, 0]
    kept = int((opacities >= math.log(1 / 255 / (1 - 1 / 255))).sum())  # ns-export drops opacity < 1/255
    assert PlyData.read(str(root / "export" / "splat.ply"))["vertex"].count == kept
