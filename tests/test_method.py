"""The trace3d method: registration, light config import, Trace3DModel on CPU, densification."""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from tests.gaussians import intrinsics, look_at, random_gaussians
from trace3d_ns.cuda.rasterization import rasterization

HEAVY = ("segment_anything", "sam2", "hydra", "skimage", "sklearn", "trimesh", "embreex", "open3d", "plyfile")  # torch itself loads triton


def test_method_is_registered_through_the_entry_point():
    eps = [ep for ep in entry_points(group="nerfstudio.method_configs") if ep.name == "trace3d"]
    assert len(eps) == 1
    spec = eps[0].load()
    assert spec.config.method_name == "trace3d"
    assert "Trace3D" in spec.description


def test_ns_train_lists_trace3d():
    out = subprocess.run([sys.executable, "-m", "nerfstudio.scripts.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "trace3d" in out.stdout


def test_config_module_imports_nothing_heavy():
    code = f"import sys, trace3d_ns.config; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_trainer_configs_are_fresh_instances():
    from trace3d_ns.config import trace3d_trainer_config

    a, b = trace3d_trainer_config(), trace3d_trainer_config()
    assert a is not b and a.pipeline.model is not b.pipeline.model


def test_cuda_request_without_gpu_gives_a_clear_message():
    from trace3d_ns.device import DeviceUnavailableError, require_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceUnavailableError, match="--machine.device-type cpu"):
        require_device("cuda")
    assert require_device("cpu") == torch.device("cpu")


def _model(seed_points):
    from nerfstudio.data.scene_box import SceneBox
    from trace3d_ns.model import Trace3DModelConfig

    cfg = Trace3DModelConfig(num_random=300, random_scale=2.0, sh_degree=1, sh_degree_interval=1)
    box = SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]]))
    return cfg.setup(scene_box=box, num_train_data=2, seed_points=seed_points, device="cpu")


def _camera(width=40, height=30):
    from nerfstudio.cameras.cameras import Cameras

    c2w = torch.linalg.inv(look_at((0.0, 0.0, 3.0)))  # OpenCV camera-to-world
    c2w[:3, 1:3] *= -1  # to nerfstudio's OpenGL convention
    K = intrinsics(width, height)
    return Cameras(
        camera_to_worlds=c2w[None, :3, :], fx=K[0, 0], fy=K[1, 1], cx=K[0, 2], cy=K[1, 2], width=width, height=height
    )


@pytest.mark.parametrize("step", [0, 1, 5])
def test_the_render_reads_the_sh_coefficients_of_the_active_degree_only(step):
    """While the degree ramps up the model passes only the active coefficients: the same render as
    with all of them, and every coefficient still gets a gradient (zero for the inactive ones)."""
    from trace3d_ns.rendering import rasterize

    from nerfstudio.engine.optimizers import Optimizers
    from trace3d_ns.config import trace3d_trainer_config

    model = _model(None)  # sh_degree 1, one step per degree
    with torch.no_grad():
        model.features_rest.normal_(0.0, 0.3)
    model.step_cb(Optimizers(trace3d_trainer_config().optimizers, model.get_param_groups()), step)
    model.config.background_color = "black"
    assert model.step == step
    degree = min(step, model.config.sh_degree)
    model.train()
    viewmat, K, W, H = model.camera_matrices(_camera())
    out = model.get_outputs(_camera())
    g = model.activated_gaussians()
    assert g["sh"].shape[1] == (model.config.sh_degree + 1) ** 2  # without a degree: all coefficients
    with torch.no_grad():
        full, alpha, _ = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], viewmat, K, W, H,
                                   sh_degree=degree, backend=model.backend)
    torch.testing.assert_close(out["accumulation"], alpha[0])
    background = model._get_background_color()  # black: not the random training colour
    expected = torch.clamp(full[..., :3] + (1 - alpha) * background, 0.0, 1.0)[0]
    assert expected.abs().sum() > 0
    torch.testing.assert_close(out["rgb"], expected, atol=2e-6, rtol=1e-5)
    out["rgb"].mean().backward()
    grad = model.features_rest.grad
    assert grad is not None and grad.shape == model.features_rest.shape
    active = (degree + 1) ** 2 - 1
    assert (grad[:, active:] == 0).all() and (active == 0 or grad[:, :active].abs().sum() > 0)


@pytest.mark.parametrize("with_seed", [True, False])
def test_model_renders_and_trains_on_cpu(with_seed):
    g = torch.Generator().manual_seed(0)
    seed = (torch.rand(300, 3, generator=g) - 0.5, torch.randint(0, 255, (300, 3), generator=g)) if with_seed else None
    model = _model(seed)
    assert model.num_points == 300
    if with_seed:  # seed colours become the SH DC term
        torch.testing.assert_close(model.features_dc[:, 0], (seed[1][:, 0].float() / 255 - 0.5) / 0.28209479177387814)
    from nerfstudio.engine.optimizers import Optimizers
    from trace3d_ns.config import trace3d_trainer_config

    optimizers = Optimizers(trace3d_trainer_config().optimizers, model.get_param_groups())  # a group each
    model.step_cb(optimizers, 0)
    model.train()
    out = model.get_outputs(_camera())
    H, W = model.last_size
    assert out["rgb"].shape == (H, W, 3) and out["accumulation"].shape == (H, W, 1)
    assert out["accumulation"].max() > 0.05  # something is in view
    out["rgb"].mean().backward()
    assert model.means.grad is not None and model.means.grad.abs().sum() > 0
    before = model.means.detach().clone()
    optimizers.optimizer_step_all()
    assert not torch.equal(before, model.means.detach())
    model.eval()
    with torch.no_grad():
        ev = model.get_outputs_for_camera(_camera())
    assert ev["depth"].shape == (30, 40, 1) and ev["rgb"].shape == (30, 40, 3)


def test_eval_metrics_skip_lpips_without_weights(monkeypatch):
    import trace3d_ns.metrics as metrics

    monkeypatch.setattr(metrics, "local_alexnet_checkpoint", lambda: None)
    with pytest.warns(UserWarning, match="LPIPS is skipped"):
        model = _model(None)
    assert model.lpips is None
    model.eval()
    with torch.no_grad():
        out = model.get_outputs_for_camera(_camera())
    batch = {"image": torch.rand(30, 40, 3)}
    m, images = model.get_image_metrics_and_images(out, batch)
    assert set(m) >= {"psnr", "ssim"} and not any("lpips" in k for k in m)
    assert images["img"].shape == (30, 80, 3)


def test_default_strategy_densifies_with_cpu_info():
    from gsplat.strategy import DefaultStrategy

    means, quats, scales, opac, colors = random_gaussians(200, seed=3, scale=(0.05, 0.2))
    params = torch.nn.ParameterDict(
        {
            "means": means, "quats": quats, "scales": torch.log(scales),
            "opacities": torch.logit(opac), "colors": colors,
        }
    )
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = DefaultStrategy(refine_start_iter=0, refine_every=2, grow_grad2d=1e-6, reset_every=10**6, verbose=False)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state()
    view, K = look_at((0.2, -0.3, 3.0)), intrinsics(48, 40)
    n0 = params["means"].shape[0]
    for step in range(3):
        rgb, alpha, info = rasterization(
            params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]),
            params["colors"], view[None], K[None], 48, 40,
        )
        strategy.step_pre_backward(params, optimizers, state, step, info)
        (rgb - 0.5).square().mean().backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad()
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
    n1 = params["means"].shape[0]
    assert n1 > n0  # grew from the CPU gradients
    for k, p in params.items():  # Adam moments follow the new count
        assert optimizers[k].state[p]["exp_avg"].shape == p.shape


def test_method_optimizers_are_fused_adam_and_survive_densification():
    """The method's Adam is torch's fused kernel on CPU parameters (per-op Adam cost more than the
    compiled backward pass); it steps like per-op Adam, and gsplat's ops carry its state."""
    from gsplat.strategy.ops import duplicate

    from trace3d_ns.config import trace3d_trainer_config

    cfg = trace3d_trainer_config().optimizers["means"]["optimizer"]
    torch.manual_seed(0)
    p_fused = torch.nn.Parameter(torch.randn(50, 3))
    p_plain = torch.nn.Parameter(p_fused.detach().clone())
    fused = cfg.setup([p_fused])
    plain = torch.optim.Adam([p_plain], lr=cfg.lr, eps=cfg.eps, fused=False)
    assert fused.defaults["fused"] is True
    for step in range(5):
        grad = torch.randn(50, 3)
        for p, opt in ((p_fused, fused), (p_plain, plain)):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(p_fused, p_plain, rtol=1e-5, atol=1e-7)
    assert not torch.equal(p_fused.detach(), torch.zeros(50, 3))

    params = torch.nn.ParameterDict({"means": p_fused})
    state = {}
    duplicate(params, {"means": fused}, state, torch.arange(50) < 10)
    p = params["means"]
    assert p.shape == (60, 3) and fused.state[p]["exp_avg"].shape == (60, 3)
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    fused.step()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), before)
    # a forced choice is respected
    assert type(cfg)(lr=1e-3, fused=False).setup([torch.nn.Parameter(torch.zeros(2))]).defaults["fused"] is False


def test_viewmat_is_eager_and_equals_splatfactos():
    """The model's world-to-camera matrices match splatfacto's, without its torch.compile wrapper
    (a viewer render interrupt inside the first compilation killed the render thread)."""
    from nerfstudio.models import splatfacto

    from trace3d_ns import model as trace3d_model

    assert trace3d_model.get_viewmat is not splatfacto.get_viewmat
    assert hasattr(splatfacto.get_viewmat, "_torchdynamo_orig_callable")  # what the check below tells apart
    assert not hasattr(trace3d_model.get_viewmat, "_torchdynamo_orig_callable")
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 3, 3, generator=g))
    c2w = torch.cat([q, torch.randn(3, 3, 1, generator=g)], dim=2)  # [3, 3, 4]
    ours = trace3d_model.get_viewmat(c2w)
    torch.testing.assert_close(ours, splatfacto.get_viewmat(c2w))
    # the inverse of the flipped pose: viewmat @ [c2w_flipped; 0 0 0 1] = I
    flipped = torch.cat([c2w[:, :, :3] * torch.tensor([1.0, -1.0, -1.0]), c2w[:, :, 3:]], dim=2)
    full = torch.cat([flipped, torch.tensor([0.0, 0, 0, 1]).expand(3, 1, 4)], dim=1)
    torch.testing.assert_close(ours @ full, torch.eye(4).expand(3, 4, 4), atol=1e-5, rtol=0)
