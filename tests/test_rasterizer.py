"""The torch rasterizer against gsplat's torch pieces and a brute-force per-pixel reference."""

from functools import partial

import pytest
import torch

from tests.gaussians import intrinsics, look_at, random_gaussians
from trace3d_ns.cuda.projection import project_gaussians
from trace3d_ns.cuda.rasterization import rasterization as _rasterization
from trace3d_ns.cuda.reference import reference_rasterize
from trace3d_ns.cuda.sh import spherical_harmonics

W, H = 45, 38  # not multiples of 16: partial border tiles


@pytest.fixture(params=["torch", "compiled"])
def backend(request):
    """The CPU compositors: the torch reference and the compiled kernels, held to the same checks."""
    return request.param


def _camera(eye=(0.3, -0.4, 3.0)):
    return look_at(eye), intrinsics(W, H)


def test_projection_matches_gsplat_torch_impl():
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    means, quats, scales, _, _ = random_gaussians(400, seed=1, extent=2.0)
    views = torch.stack([look_at((0.3, -0.4, 3.0)), look_at((2.5, 1.0, 1.0))])
    Ks = torch.stack([intrinsics(W, H), intrinsics(W, H, 40.0)])
    ours = project_gaussians(means, quats, scales, views, Ks, W, H, calc_compensations=True)
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, comp = _fully_fused_projection(
        means, covars, views, Ks, W, H, calc_compensations=True
    )
    assert ours.radii.dtype == torch.int32
    assert torch.equal(ours.radii, radii)
    assert (ours.radii > 0).sum() > 100 and (ours.radii == 0).sum() > 0  # both cases exercised
    vis = radii > 0
    torch.testing.assert_close(ours.means2d[vis], means2d[vis])
    torch.testing.assert_close(ours.depths, depths)
    torch.testing.assert_close(ours.conics[vis], conics[vis], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.compensations[vis], comp[vis])


def test_projection_culls_near_far_and_radius_clip():
    means = torch.tensor([[0.0, 0.0, -3.0 + 0.005], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    quats = torch.tensor([[1.0, 0, 0, 0]]).repeat(3, 1)
    scales = torch.full((3, 3), 0.05)
    proj = project_gaussians(means, quats, scales, look_at((0, 0, -3.0))[None], intrinsics(W, H)[None], W, H, far_plane=6.0)
    assert proj.radii[0, 0] == 0 and proj.radii[0, 1] > 0 and proj.radii[0, 2] == 0
    clipped = project_gaussians(means, quats, scales, look_at((0, 0, -3.0))[None], intrinsics(W, H)[None], W, H, radius_clip=1e3)
    assert (clipped.radii == 0).all()


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_spherical_harmonics_match_gsplat(degree):
    from gsplat.cuda._torch_impl import _spherical_harmonics

    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(200, 3, generator=g)
    coeffs = torch.randn(200, 16, 3, generator=g)
    torch.testing.assert_close(spherical_harmonics(degree, dirs, coeffs), _spherical_harmonics(degree, dirs, coeffs))


def _leaves(seed, n, sh_degree=None):
    params = random_gaussians(n, seed=seed, sh_degree=sh_degree)
    return [p.clone().requires_grad_(True) for p in params]


@pytest.mark.parametrize("sh_degree,mode", [(None, "classic"), (3, "classic"), (1, "antialiased")])
def test_rasterizer_matches_bruteforce_forward_and_gradients(sh_degree, mode, backend):
    rasterization = partial(_rasterization, backend=backend)
    view, K = _camera()
    ours = _leaves(2, 300, sh_degree)
    ref = _leaves(2, 300, sh_degree)
    bg = torch.tensor([0.2, 0.5, 0.1])
    colors, alphas, meta = rasterization(
        *ours, view[None], K[None], W, H, sh_degree=sh_degree, backgrounds=bg[None], render_mode="RGB+ED",
        rasterize_mode=mode,
    )
    if mode == "antialiased":  # the reference has no compensation: feed it compensated opacities
        from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

        covars, _ = _quat_scale_to_covar_preci(ref[1], ref[2], compute_preci=False)
        comp = _fully_fused_projection(ref[0], covars, view[None], K[None], W, H, calc_compensations=True)[4]
        ref_opac = ref[3] * comp[0]
    else:
        ref_opac = ref[3]
    r_rgb, r_alpha, r_depth, _ = reference_rasterize(
        ref[0], ref[1], ref[2], ref_opac, ref[4], view, K, W, H, sh_degree=sh_degree, background=bg
    )
    assert colors.shape == (1, H, W, 4) and alphas.shape == (1, H, W, 1)
    assert (r_alpha > 0.5).float().mean() > 0.2  # the scene actually covers the image
    torch.testing.assert_close(colors[0, ..., :3], r_rgb, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alphas[0], r_alpha, atol=2e-5, rtol=1e-4)
    covered = r_alpha[..., 0] > 0.05
    torch.testing.assert_close(colors[0, ..., 3][covered], r_depth[..., 0][covered], atol=1e-4, rtol=1e-4)

    g = torch.Generator().manual_seed(7)
    w_rgb, w_alpha = torch.randn(H, W, 3, generator=g), torch.randn(H, W, 1, generator=g)
    ((colors[0, ..., :3] * w_rgb).sum() + (alphas[0] * w_alpha).sum()).backward()
    ((r_rgb * w_rgb).sum() + (r_alpha * w_alpha).sum()).backward()
    for name, a, b in zip(["means", "quats", "scales", "opacities", "colors"], ours, ref):
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=2e-3, msg=lambda m: f"{name}: {m}")


def test_render_modes_and_backgrounds(backend):
    rasterization = partial(_rasterization, backend=backend)
    view, K = _camera()
    params = random_gaussians(150, seed=3)
    rgb, a1, _ = rasterization(*params, view[None], K[None], W, H, render_mode="RGB")
    d, a2, _ = rasterization(*params, view[None], K[None], W, H, render_mode="D")
    ed, _, _ = rasterization(*params, view[None], K[None], W, H, render_mode="ED")
    rgbd, _, _ = rasterization(*params, view[None], K[None], W, H, render_mode="RGB+D")
    assert rgb.shape[-1] == 3 and d.shape[-1] == 1 and ed.shape[-1] == 1 and rgbd.shape[-1] == 4
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(rgbd[..., :3], rgb)
    torch.testing.assert_close(rgbd[..., 3:], d)
    torch.testing.assert_close(ed * a1.clamp(min=1e-10), d, atol=1e-5, rtol=1e-5)
    bg = torch.tensor([[1.0, 0.0, 0.0]])
    rgb_bg, _, _ = rasterization(*params, view[None], K[None], W, H, backgrounds=bg)
    torch.testing.assert_close(rgb_bg, rgb + (1 - a1) * bg)


def test_multiple_cameras_equal_separate_renders(backend):
    rasterization = partial(_rasterization, backend=backend)
    params = random_gaussians(200, seed=4, sh_degree=2)
    views = torch.stack([look_at((0.3, -0.4, 3.0)), look_at((-2.0, 0.5, 2.0))])
    Ks = torch.stack([intrinsics(W, H), intrinsics(W, H, 50)])
    both, alphas, meta = rasterization(*params, views, Ks, W, H, sh_degree=2)
    assert meta["n_cameras"] == 2 and meta["radii"].shape == (2, 200)
    for c in range(2):
        one, a, _ = rasterization(*params, views[c : c + 1], Ks[c : c + 1], W, H, sh_degree=2)
        torch.testing.assert_close(both[c], one[0])
        torch.testing.assert_close(alphas[c], a[0])


def test_transmittance_cutoff_and_alpha_clamp(backend):
    rasterization = partial(_rasterization, backend=backend)
    # A stack of 40 nearly opaque Gaussians on the optical axis: compositing must stop once
    # T would fall to 1e-4, and no single alpha may exceed 0.999.
    n = 40
    means = torch.zeros(n, 3)
    means[:, 2] = torch.linspace(0.0, 1e-3, n)  # same footprint, distinct depths
    quats = torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1)
    scales = torch.full((n, 3), 0.3)
    opac = torch.full((n,), 0.9)
    colors = torch.eye(3)[torch.arange(n) % 3]
    view, K = look_at((0, 0, -3.0)), intrinsics(W, H)
    from trace3d_ns.rendering import contributions

    contrib = contributions(means, quats, scales, opac, view, K, W, H, backend=backend)
    centre = (H // 2) * W + W // 2
    at_centre = contrib.weights[contrib.pixel_ids == centre]
    # identical layers: every layer has the first one's alpha; stop exactly before T <= 1e-4
    a = at_centre[0]
    t_final = 1.0 - at_centre.sum()
    assert 2 <= at_centre.numel() < n
    torch.testing.assert_close(at_centre, a * (1 - a) ** torch.arange(at_centre.numel()), rtol=1e-3, atol=1e-7)
    assert t_final > 1e-4 and t_final * (1 - a) <= 1e-4
    big = torch.full((n, 3), 1.5)  # so wide that the centre pixel sees opacity 1 unclamped
    rgb, alpha, _ = rasterization(means, quats, big, torch.full((n,), 1.0), colors, view[None], K[None], W, H)
    # centre: the first Gaussian alone, its alpha clamped to 0.999; the next would leave T = 1e-6
    torch.testing.assert_close(alpha[0, H // 2, W // 2, 0], torch.tensor(0.999))
    torch.testing.assert_close(rgb[0, H // 2, W // 2], 0.999 * colors[0])


def test_absgrad_accumulates_per_pixel_magnitudes(backend):
    rasterization = partial(_rasterization, backend=backend)
    view, K = _camera()
    params = [p.requires_grad_(True) for p in random_gaussians(200, seed=5)]
    colors, _, meta = rasterization(*params, view[None], K[None], W, H, absgrad=True)
    meta["means2d"].retain_grad()
    (colors * torch.randn_like(colors)).sum().backward()
    grad, absgrad = meta["means2d"].grad, meta["means2d"].absgrad
    assert absgrad.shape == grad.shape
    assert (absgrad >= grad.abs() - 1e-6).all()
    assert (absgrad > grad.abs() + 1e-6).any()  # per-pixel signs cancel in grad, not in absgrad
    assert (absgrad[meta["radii"] == 0] == 0).all()


def test_unsupported_arguments_raise_clearly():
    view, K = _camera()
    params = random_gaussians(10, seed=6)
    with pytest.raises(NotImplementedError, match="packed=False"):
        _rasterization(*params, view[None], K[None], W, H, packed=True)
    with pytest.raises(ValueError, match="render_mode"):
        _rasterization(*params, view[None], K[None], W, H, render_mode="RGBD")


@pytest.mark.parametrize("grad_to_geometry", [False, True])
def test_extra_colors_share_the_pass_and_match_a_second_render(grad_to_geometry, backend):
    rasterization = partial(_rasterization, backend=backend)
    from trace3d_ns.rendering import rasterize_with_extra

    view, K = _camera()
    means, quats, scales, opac, colors = [p.requires_grad_(True) for p in random_gaussians(200, seed=8)]
    feats = torch.randn(200, 5, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    rgb, alpha, meta, extra = rasterize_with_extra(
        means, quats, scales, opac, colors, view[None], K[None], W, H, extra_colors=feats,
        extra_grad_to_geometry=grad_to_geometry,
    )
    assert "extra_render" not in meta and extra.shape == (1, H, W, 5)
    second, _, _ = rasterization(means.detach(), quats.detach(), scales.detach(), opac.detach(), feats.detach(), view[None], K[None], W, H)
    torch.testing.assert_close(extra.detach(), second, atol=1e-5, rtol=1e-5)
    extra.square().sum().backward()
    assert feats.grad.abs().sum() > 0
    assert (means.grad is not None and means.grad.abs().sum() > 0) == grad_to_geometry
