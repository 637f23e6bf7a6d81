"""Footprint masses and the hidden score: Gaussians that other surfaces partly hide."""

from __future__ import annotations

import math

import pytest
import torch

from tests.gaussians import intrinsics, look_at, random_gaussians
from trace3d_ns.git.tracing import TraceAccumulator
from trace3d_ns.git.visibility import HiddenConfig, hidden_scores
from trace3d_ns.rendering import contributions, footprint_masses

W, H = 64, 48


def _alpha_sums(means, quats, scales, opacities, viewmat, K):
    """Brute force: every Gaussian's alpha summed over every pixel, nothing in front (torch projection)."""
    from trace3d_ns.cuda.projection import project_gaussians

    radii, means2d, _, conics, _ = project_gaussians(means, quats, scales, viewmat[None], K[None], W, H, eps2d=0.3)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
    dx = means2d[0, :, 0, None, None].double() - xs  # [N, H, W]
    dy = means2d[0, :, 1, None, None].double() - ys
    a, b, c = (conics[0, :, k, None, None].double() for k in range(3))
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = (opacities.double()[:, None, None] * torch.exp(-sigma)).clamp(max=0.999)
    alpha = torch.where((sigma >= 0) & (alpha >= 1 / 255), alpha, torch.zeros_like(alpha))
    return alpha.sum((1, 2)), radii[0]


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_footprint_mass_is_the_alpha_sum_of_gaussians_in_frame(backend):
    means, quats, scales, opacities, _ = random_gaussians(60, seed=3, extent=0.6, scale=(0.02, 0.08))
    viewmat, K = look_at((0.3, -0.4, -1.3)), intrinsics(W, H)
    mass, in_frame = footprint_masses(means, quats, scales, opacities, viewmat, K, W, H, backend=backend)  # [N], [N]
    brute, radii = _alpha_sums(means, quats, scales, opacities, viewmat, K)
    assert mass.shape == in_frame.shape == (60,) and 10 < int(in_frame.sum()) < 60  # some cut by the image's edge
    torch.testing.assert_close(mass[in_frame].double(), brute[in_frame], rtol=0.01, atol=1e-3)
    assert torch.all(mass[radii == 0] == 0) and not in_frame[radii == 0].any()


def test_footprint_mass_of_a_lone_gaussian_is_what_it_draws():
    means = torch.tensor([[0.0, 0.0, 0.0]])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    scales, opacities = torch.full((1, 3), 0.05), torch.tensor([0.7])
    viewmat, K = look_at((0.0, 0.0, -2.0)), intrinsics(W, H)
    mass, in_frame = footprint_masses(means, quats, scales, opacities, viewmat, K, W, H)
    drawn = contributions(means, quats, scales, opacities, viewmat, K, W, H).weights.sum()
    assert bool(in_frame[0]) and abs(float(mass[0]) - float(drawn)) < 0.01 * float(drawn)
    with pytest.raises(ValueError, match="one view"):
        footprint_masses(means, quats, scales, opacities, viewmat[None], K, W, H)


def _floor_scene():
    """An opaque floor (z = 0, a grid of flat Gaussians) and two small Gaussians on it: one centred on
    the floor plane (its lower half under the floor), one resting above it."""
    xs = torch.linspace(-1.0, 1.0, 21)
    gx, gy = torch.meshgrid(xs, xs, indexing="ij")
    floor = torch.stack([gx.ravel(), gy.ravel(), torch.zeros(gx.numel())], 1)  # [F, 3]
    objects = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.15]])  # straddling, above
    means = torch.cat([floor, objects])
    quats = torch.zeros(len(means), 4)
    quats[:, 0] = 1.0
    scales = torch.cat([torch.tensor([[0.07, 0.07, 0.002]]).expand(len(floor), 3), torch.full((2, 3), 0.04)])
    opacities = torch.cat([torch.full((len(floor),), 0.99), torch.full((2,), 0.9)])
    return means, quats, scales, opacities


def test_a_gaussian_under_the_floor_is_hidden_from_every_view():
    means, quats, scales, opacities = _floor_scene()
    n = len(means)
    eyes = [(2.0 * math.cos(t), 2.0 * math.sin(t), 1.2) for t in torch.linspace(0, 2 * math.pi, 7)[:-1].tolist()]
    views = [(look_at(e, up=(0.0, 0.0, 1.0)), intrinsics(W, H)) for e in eyes]
    acc = TraceAccumulator(n, len(views))
    for v, (viewmat, K) in enumerate(views):
        acc.add_view(v, contributions(means, quats, scales, opacities, viewmat, K, W, H), torch.zeros(H, W, dtype=torch.int32))
    traces = acc.build()

    def masses(v):
        return footprint_masses(means, quats, scales, opacities, views[v][0], views[v][1], W, H)

    score, counted = hidden_scores(traces, masses, HiddenConfig(min_weight=0.5))
    straddling, above = n - 2, n - 1
    assert counted[straddling] == counted[above] == len(views)
    assert float(score[straddling]) == 1.0 and float(score[above]) == 0.0
    with pytest.raises(ValueError, match="visible_share"):
        hidden_scores(traces, masses, HiddenConfig(visible_share=0.0))
    with pytest.raises(ValueError, match="masses of"):
        hidden_scores(traces, lambda v: (torch.ones(3), torch.ones(3, dtype=torch.bool)))


def test_footprint_masses_take_gsplats_projection_on_cuda(monkeypatch):
    # The CUDA branch, run here with the torch projection in gsplat's place (same arguments, same outputs).
    import gsplat.cuda._wrapper as wrapper

    from trace3d_ns import rendering
    from trace3d_ns.cuda.projection import project_gaussians

    calls = []

    def fake_projection(means, covars, quats, scales, viewmats, Ks, width, height, **kwargs):
        calls.append(covars)
        return project_gaussians(means, quats, scales, viewmats, Ks, width, height, **kwargs)

    means, quats, scales, opacities, _ = random_gaussians(40, seed=5, extent=0.6, scale=(0.02, 0.08))
    viewmat, K = look_at((0.3, -0.4, -1.3)), intrinsics(W, H)
    expected = footprint_masses(means, quats, scales, opacities, viewmat, K, W, H, rasterize_mode="antialiased", backend="torch")
    monkeypatch.setattr(wrapper, "fully_fused_projection", fake_projection)
    monkeypatch.setattr(rendering, "resolve_backend", lambda backend, device: "gsplat")
    got = footprint_masses(means, quats, scales, opacities, viewmat, K, W, H, rasterize_mode="antialiased")
    assert calls == [None]
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
