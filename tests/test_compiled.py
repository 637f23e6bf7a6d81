"""The compiled (numba) CPU backend against the torch backend and the brute-force reference.

The shared checks (brute force, render modes, cut-off, absgrad, extra channels, contributions) run
on both backends in test_rasterizer.py / test_contributions.py; here: each compiled stage against
its torch reference, edge cases, GIT sums, and what happens when numba cannot run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gaussians import intrinsics, look_at, random_gaussians
from trace3d_ns.cuda import compiled
from trace3d_ns.cuda.projection import project_gaussians
from trace3d_ns.cuda.rasterization import rasterization
from trace3d_ns.cuda.reference import reference_rasterize
from trace3d_ns.cuda.sh import spherical_harmonics
from trace3d_ns.cuda.tiles import contributing_pairs, intersect_tiles, sum_pairs_by_patch
from trace3d_ns.rendering import contributions, patch_weights

ROOT = Path(__file__).resolve().parents[1]
W, H = 45, 38


def _random_cotangents(tensors, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g) for t in tensors]


def test_projection_kernel_matches_torch_with_gradients():
    means, quats, scales, _, _ = random_gaussians(400, seed=1, extent=2.0)
    views = torch.stack([look_at((0.3, -0.4, 3.0)), look_at((2.5, 1.0, 1.0))])
    Ks = torch.stack([intrinsics(W, H), intrinsics(W, H, 40.0)])
    results = {}
    for name, project in [("torch", project_gaussians), ("compiled", compiled.project)]:
        leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales)]
        p = project(*leaves, views, Ks, W, H, calc_compensations=True)
        visible = p.radii > 0
        outs = [p.means2d, p.depths, p.conics[visible], p.compensations]
        sum((o * v).sum() for o, v in zip(outs, _random_cotangents(outs))).backward()
        results[name] = (p, [t.grad for t in leaves])
    (ref, ref_grads), (ours, our_grads) = results["torch"], results["compiled"]
    assert torch.equal(ours.radii, ref.radii)
    assert (ref.radii > 0).sum() > 100 and (ref.radii == 0).sum() > 0  # both cases exercised
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name, a, b in zip(["means", "quats", "scales"], our_grads, ref_grads):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_culled_gaussians_get_no_gradient_even_on_the_camera_plane(backend):
    """A Gaussian exactly at the camera's depth 0 projects to inf; as in gsplat, culled Gaussians are
    left out of the backward pass, so no 0 * inf reaches the parameters (it once left a few NaN
    Gaussians per training run)."""
    view = look_at((0.3, -0.4, 3.0))
    cam = torch.linalg.inv(view)
    origin, forward = cam[:3, 3], cam[:3, 2]
    means = torch.stack([
        origin,  # depth 0
        origin - 0.5 * forward,  # behind
        origin + 0.005 * forward,  # in front of the near plane
        origin + 2.0 * forward + 50.0 * cam[:3, 0],  # far off screen
        origin + 2.0 * forward,  # visible
    ])
    quats = torch.tensor([[1.0, 0.2, -0.1, 0.3]]).repeat(len(means), 1)
    scales = torch.full((len(means), 3), 0.1)
    leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales)]
    project = project_gaussians if backend == "torch" else compiled.project
    p = project(*leaves, view[None], intrinsics(W, H)[None], W, H, calc_compensations=True)
    assert p.radii[0].tolist()[:4] == [0, 0, 0, 0] and p.radii[0, 4] > 0
    outs = [p.means2d, p.depths, p.conics, p.compensations]
    sum((o * v).sum() for o, v in zip(outs, _random_cotangents(outs))).backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
        assert torch.all(t.grad[:4] == 0)
        assert t.grad[4].abs().sum() > 0


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_kernel_matches_torch_with_gradients(degree):
    means, *_ = random_gaussians(300, seed=degree)
    coeffs = torch.randn(300, 16, 3, generator=torch.Generator().manual_seed(5))
    campos = torch.tensor([[0.3, -0.4, 3.0], [2.0, 1.0, -1.0]])
    results = {}
    for name in ("torch", "compiled"):
        m, c = means.clone().requires_grad_(True), coeffs.clone().requires_grad_(True)
        if name == "torch":
            colors = torch.clamp_min(spherical_harmonics(degree, m[None] - campos[:, None], c.expand(2, -1, -1, -1)) + 0.5, 0)
        else:
            colors = compiled.sh_colors(degree, m, campos, c)
        (colors * _random_cotangents([colors])[0]).sum().backward()
        results[name] = (colors, torch.zeros_like(m) if m.grad is None else m.grad, c.grad)
    assert (results["torch"][0] == 0).any()  # the clamp is exercised
    for a, b in zip(results["compiled"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tile_binning_kernel_matches_torch():
    means, quats, scales, _, _ = random_gaussians(500, seed=2, extent=2.0)
    views = torch.stack([look_at((0.3, -0.4, 3.0)), look_at((-1.0, 2.0, 2.0))])
    Ks = torch.stack([intrinsics(W, H), intrinsics(W, H, 70.0)])
    p = project_gaussians(means, quats, scales, views, Ks, W, H)
    p.depths[0, :50] = p.depths[0, 50:100]  # equal depths: stable order by Gaussian
    ours = compiled.intersect_tiles(p.means2d, p.radii, p.depths, 16, 3, 3)
    ref = intersect_tiles(p.means2d, p.radii, p.depths, 16, 3, 3)
    for name, a, b in zip(ref._fields, ours, ref):
        assert torch.equal(a, b), name


def test_radix_depth_sort_is_a_stable_argsort():
    """Depths over many octaves (every 11-bit digit matters), ties and zero, as the binning sorts them."""
    import numpy as np

    kernels = compiled._geometry()
    rng = np.random.default_rng(4)
    depths = (10.0 ** rng.uniform(-3, 4, 5000)).astype(np.float32)
    depths[:300] = depths[300:600]  # ties keep Gaussian order
    depths[700:710] = 0.0
    order = kernels._radix_sort_pairs(depths.view(np.int32), np.arange(depths.size, dtype=np.int32))
    assert np.array_equal(order, np.argsort(depths, kind="stable"))


def _edge_scene():
    """Gaussians behind the camera, straddling the near plane, larger than the image, off-screen,
    a stack that saturates the centre pixels, and an empty corner."""
    g = torch.Generator().manual_seed(3)
    n = 60
    means = torch.cat([
        torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 2.995], [0.0, 0.0, 0.0], [30.0, 0.0, 0.0]]),  # behind, near plane, huge, off-screen
        torch.stack([torch.zeros(n), torch.zeros(n), torch.linspace(-0.5, 0.5, n)], 1),  # opaque stack
        (torch.rand(40, 3, generator=g) - 0.5) * torch.tensor([1.0, 1.0, 0.5]) + torch.tensor([-0.6, -0.5, 0.0]),
    ])
    N = means.shape[0]
    quats = torch.randn(N, 4, generator=g)
    scales = torch.full((N, 3), 0.08)
    scales[2] = 3.0  # a splat larger than the image
    scales[1] = 0.2
    opac = torch.full((N,), 0.95)
    colors = torch.rand(N, 3, generator=g)
    return means, quats, scales, opac, colors, look_at((0.0, 0.0, 3.0))


@pytest.mark.parametrize("size", [(1, 1), (17, 5), (33, 47)])
def test_edge_cases_match_the_reference(size):
    width, height = size
    means, quats, scales, opac, colors, view = _edge_scene()
    K = intrinsics(width, height)
    leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors)]
    bg = torch.tensor([[0.3, 0.2, 0.9]])
    rgb, alpha, meta = rasterization(*leaves, view[None], K[None], width, height, backgrounds=bg, backend="compiled")
    r_rgb, r_alpha, _, _ = reference_rasterize(*ref_leaves, view, K, width, height, background=bg[0])
    assert (meta["radii"][0, :2] == 0).all()  # behind the camera and at the near plane: culled
    torch.testing.assert_close(rgb[0], r_rgb, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alpha[0], r_alpha, atol=2e-5, rtol=1e-4)
    cot = _random_cotangents([r_rgb, r_alpha], seed=1)
    ((rgb[0] * cot[0]).sum() + (alpha[0] * cot[1]).sum()).backward()
    ((r_rgb * cot[0]).sum() + (r_alpha * cot[1]).sum()).backward()
    for name, a, b in zip(["means", "quats", "scales", "opacities", "colors"], leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=2e-3, msg=lambda m: f"{name}: {m}")


def test_saturated_pixels_stop_where_the_torch_backend_stops():
    means, quats, scales, opac, _, view = _edge_scene()
    K = intrinsics(W, H)
    p = project_gaussians(means, quats, scales, view[None], K[None], W, H)
    args = (p.means2d[0], p.conics[0], opac, p.radii[0], p.depths[0], W, H, 16)
    gids, pids, weights = compiled.contributing_pairs(*args)
    ref_g, ref_p, ref_w = contributing_pairs(*args, return_weights=True)
    assert torch.equal(gids, ref_g) and torch.equal(pids, ref_p)  # same pairs, same order
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-4)
    centre = (H // 2) * W + W // 2
    assert 1.0 - weights[pids == centre].sum() < 1e-3  # the centre saturates ...
    assert (pids == centre).sum() < 60  # ... and stops before the stack ends


def test_zero_gaussians_and_empty_views():
    view, K = look_at((0.0, 0.0, 3.0)), intrinsics(W, H)
    empty = [torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 3)]
    rgb, alpha, meta = rasterization(*empty, view[None], K[None], W, H, backgrounds=torch.ones(1, 3), backend="compiled")
    assert rgb.shape == (1, H, W, 3) and torch.equal(rgb, torch.ones(1, H, W, 3)) and alpha.abs().max() == 0
    behind = random_gaussians(20, seed=4)
    behind = (behind[0] + torch.tensor([0.0, 0.0, 10.0]),) + behind[1:]  # all behind the camera
    c = contributions(*behind[:4], view, K, W, H, backend="compiled")
    assert len(c) == 0
    labels = torch.zeros(H, W, dtype=torch.long)
    g, patch, w = patch_weights(*behind[:4], view, K, labels, backend="compiled")
    assert g.numel() == patch.numel() == w.numel() == 0


def test_patch_sums_equal_the_summed_pairs():
    (means, quats, scales, opac, _), view = random_gaussians(400, seed=6), look_at((0.4, -0.3, 3.0))
    K = intrinsics(W, H)
    g = torch.Generator().manual_seed(2)
    patch_map = torch.randint(0, 7, (H // 4 + 1, W // 4 + 1), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
    patch_map = patch_map[:H, :W]  # blocks of patches, so Gaussians span several
    pairs = contributions(means, quats, scales, opac, view, K, W, H, backend="torch")
    ref = sum_pairs_by_patch(pairs.gaussian_ids, patch_map.reshape(-1)[pairs.pixel_ids], pairs.weights)
    ours = patch_weights(means, quats, scales, opac, view, K, patch_map, backend="compiled")
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    torch.testing.assert_close(ours[2], ref[2], atol=1e-6, rtol=1e-4)
    assert (torch.bincount(ours[0]) > 1).sum() > 20  # many Gaussians straddle patches


def test_memory_guard_names_the_scene(monkeypatch):
    means, quats, scales, opac, colors = random_gaussians(50, seed=7)
    view, K = look_at((0.0, 0.0, 3.0)), intrinsics(W, H)
    monkeypatch.setattr(compiled.os, "sysconf", lambda name: 1)  # 1 free page of 1 byte
    with pytest.raises(MemoryError, match=r"50 Gaussians at 45x38"):
        rasterization(means, quats, scales, opac, colors, view[None], K[None], W, H, backend="compiled")


def _run_python(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


_FALLBACK_PROBE = """
import warnings, torch
from tests.gaussians import intrinsics, look_at, random_gaussians
from trace3d_ns.rendering import rasterize
warnings.simplefilter("always")
params = random_gaussians(30, seed=1)
with warnings.catch_warnings(record=True) as caught:
    for _ in range(2):
        rgb, alpha, _ = rasterize(*params, look_at((0, 0, 3.0))[None], intrinsics(20, 20)[None], 20, 20)
messages = [str(w.message) for w in caught if "compiled CPU rasterizer" in str(w.message)]
print(len(messages)); print(messages[0] if messages else "")
print(float(alpha.max()) > 0)
"""


def test_numba_missing_falls_back_to_torch_with_one_warning():
    blocker = "import sys; sys.modules['numba'] = None\n"
    result = _run_python(blocker + _FALLBACK_PROBE, {})
    assert result.returncode == 0, result.stderr
    count, message, rendered = result.stdout.strip().splitlines()
    assert count == "1" and "numba is not installed" in message and "torch backend" in message
    assert rendered == "True"


def test_unwritable_numba_cache_falls_back_to_torch_with_one_warning():
    # numba tries each cache folder (NUMBA_CACHE_DIR, __pycache__, the user's cache) with this check;
    # as root every folder is writable, so the check itself is made to fail
    unwritable = (
        "import numba.core.caching as caching\n"
        "def refuse(self): raise PermissionError(13, 'Permission denied', self.get_cache_path())\n"
        "caching._CacheLocator.ensure_cache_path = refuse\n"
    )
    result = _run_python(unwritable + _FALLBACK_PROBE, {})
    assert result.returncode == 0, result.stderr
    count, message, rendered = result.stdout.strip().splitlines()
    assert count == "1" and "NUMBA_CACHE_DIR" in message
    assert rendered == "True"


def test_backend_choice_is_validated():
    from trace3d_ns.rendering import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "compiled"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("gsplat", torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("vulkan", torch.device("cpu"))


@pytest.mark.parametrize("grad_to_geometry", [False, True])
def test_extra_channels_with_a_few_sampled_pixels_match_torch(grad_to_geometry):
    """The contrastive loss reads the features of a few sampled pixels: the compiled backward skips
    the extra channels where their gradient is zero, and must give the torch backend's gradients."""
    from trace3d_ns.rendering import rasterize_with_extra

    view, K = look_at((0.3, -0.4, 3.0)), intrinsics(W, H)
    sampled = torch.rand(H, W, generator=torch.Generator().manual_seed(3)) < 0.05  # [H, W] about 85 pixels
    grads = {}
    for backend in ("torch", "compiled"):
        params = [p.requires_grad_(True) for p in random_gaussians(300, seed=12)]
        feats = torch.randn(300, 6, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        rgb, alpha, _, extra = rasterize_with_extra(
            *params, view[None], K[None], W, H, extra_colors=feats, extra_grad_to_geometry=grad_to_geometry,
            backend=backend,
        )
        (rgb.square().sum() + alpha.sum() + (extra[0][sampled] ** 2).sum()).backward()
        grads[backend] = [p.grad.clone() for p in params] + [feats.grad.clone()]
    assert grads["compiled"][-1].abs().sum() > 0
    for a, b in zip(grads["compiled"], grads["torch"]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("grad_to_geometry", [False, True])
def test_extra_channels_composited_only_at_requested_pixels_match_torch(grad_to_geometry):
    """With `extra_pixels` the compiled backend composites the extra channels only there: outputs
    (0 elsewhere) and every gradient equal the torch backend's, even for a loss that also reads
    pixels outside the request (their extra render is a constant 0)."""
    from trace3d_ns.rendering import rasterize_with_extra

    view, K = look_at((0.3, -0.4, 3.0)), intrinsics(W, H)
    g = torch.Generator().manual_seed(5)
    wanted = (torch.rand(1, H, W, generator=g) < 0.1)  # [1, H, W]
    read = torch.rand(H, W, generator=g) < 0.2  # the loss reads these, some outside `wanted`
    out = {}
    for backend in ("torch", "compiled"):
        params = [p.requires_grad_(True) for p in random_gaussians(300, seed=12)]
        feats = torch.randn(300, 6, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        rgb, alpha, _, extra = rasterize_with_extra(
            *params, view[None], K[None], W, H, extra_colors=feats, extra_grad_to_geometry=grad_to_geometry,
            backend=backend, extra_pixels=wanted,
        )
        (rgb.square().sum() + alpha.sum() + (extra[0][read] ** 2).sum()).backward()
        out[backend] = [rgb.detach(), extra.detach()] + [p.grad.clone() for p in params] + [feats.grad.clone()]
    full = rasterize_with_extra(*[p.detach() for p in random_gaussians(300, seed=12)], view[None], K[None], W, H,
                                extra_colors=torch.randn(300, 6, generator=torch.Generator().manual_seed(4)),
                                backend="compiled")[3]
    extra = out["compiled"][1]
    assert (extra[~wanted] == 0).all() and (extra[wanted] != 0).any()
    torch.testing.assert_close(extra[wanted], full[wanted], atol=1e-6, rtol=1e-5)  # as if composited everywhere
    for a, b in zip(out["compiled"], out["torch"]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-3)
    with pytest.raises(ValueError, match="extra_pixels"):
        rasterize_with_extra(*random_gaussians(30, seed=1), view[None], K[None], W, H,
                             extra_colors=torch.zeros(30, 2), backend="compiled", extra_pixels=wanted[0])


def _sparse_pairs(wanted, n=300, seed=12):
    """compiled.composite with sparse_pairs on one random view: (render, alpha, pixel, entry, weight)
    and the scene's full contribution list."""
    view, K = look_at((0.3, -0.4, 3.0)), intrinsics(W, H)
    means, quats, scales, opacities, colors = random_gaussians(n, seed=seed)
    p = compiled.project(means, quats, scales, view[None], K[None], W, H)
    isect = compiled.intersect_tiles(p.means2d, p.radii, p.depths, 16, -(-W // 16), -(-H // 16))
    out = compiled.composite(p.means2d, p.conics, opacities[None], colors[None, :, :3].contiguous(), None, isect, W, H, 16,
                             sparse_pixels=wanted, sparse_pairs=True)
    return out, contributions(means, quats, scales, opacities, view, K, W, H, backend="torch")


class _Pairs(compiled._PairRecord):
    """`compiled.PAIR_RECORD` for tests with a fixed buffer size (entries per worker) per pass."""

    def __init__(self, capacity):
        super().__init__()
        self.fixed, self.sizes = capacity, []

    def capacity(self, num_sparse):
        self.sizes.append(self.fixed)
        return self.fixed


def test_the_render_lists_its_visits_at_sparse_pixels_as_the_contributions_there(monkeypatch):
    """`sparse_pairs`: the pairs listed at the requested pixels are the scene's contributions there
    (same Gaussians and alpha * T, front to back per pixel), the render is unchanged, and a buffer
    too small for them is counted over and the pass repeated once with the same result."""
    g = torch.Generator().manual_seed(7)
    wanted = torch.rand(1, H, W, generator=g) < 0.15
    (render, alpha, pixel, entry, weight), full = _sparse_pairs(wanted)
    keep = wanted.reshape(-1)[full.pixel_ids]
    by_pixel = torch.sort(pixel, stable=True).indices  # listed tile by tile, front to back within a pixel
    assert torch.equal(pixel[by_pixel], full.pixel_ids[keep])
    assert entry.dtype == torch.int64 and torch.equal(entry[by_pixel], full.gaussian_ids[keep])
    torch.testing.assert_close(weight[by_pixel], full.weights[keep], atol=1e-6, rtol=1e-5)
    view, K = look_at((0.3, -0.4, 3.0)), intrinsics(W, H)
    means, quats, scales, opacities, colors = random_gaussians(300, seed=12)
    plain, plain_alpha, _ = rasterization(means, quats, scales, opacities, colors[:, :3], view[None], K[None], W, H,
                                          backend="compiled")
    assert torch.equal(render, plain) and torch.equal(alpha, plain_alpha)
    small = _Pairs(3)
    monkeypatch.setattr(compiled, "PAIR_RECORD", small)
    (_, _, pixel2, entry2, weight2), _ = _sparse_pairs(wanted)
    assert len(small.sizes) == 1 and pixel.numel() > 3  # the second pass took the counted size
    assert torch.equal(pixel2, pixel) and torch.equal(entry2, entry) and torch.equal(weight2, weight)
    with pytest.raises(ValueError, match="sparse_pairs"):
        compiled.composite(torch.zeros(1, 2, 2), torch.ones(1, 2, 3), torch.ones(1, 2), torch.zeros(1, 2, 3), None,
                           compiled.intersect_tiles(torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.int32),
                                                    torch.ones(1, 2), 16, 1, 1), 4, 4, 16, sparse_pairs=True)


def test_weighted_rows_is_index_add_of_index_select_with_its_gradient():
    g = torch.Generator().manual_seed(8)
    source = torch.randn(50, 7, generator=g, requires_grad=True)
    index_in = torch.randint(0, 50, (400,), generator=g)
    index_out = torch.randint(0, 30, (400,), generator=g)
    weight = torch.rand(400, generator=g)
    cotangent = torch.randn(30, 7, generator=g)
    ours = compiled.weighted_rows(source, index_out, index_in, weight, 30)
    (ours * cotangent).sum().backward()
    grad, source.grad = source.grad.clone(), None
    ref = torch.zeros(30, 7).index_add(0, index_out, weight[:, None] * source.index_select(0, index_in))
    (ref * cotangent).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, source.grad, atol=1e-6, rtol=1e-5)
    empty = compiled.weighted_rows(source, index_out[:0], index_in[:0], weight[:0], 4)
    assert empty.shape == (4, 7) and not empty.any()


class _Record(compiled._VisitRecord):
    """`compiled.VISIT_RECORD` for tests: None records nothing; `learn=False` keeps the given size."""

    def __init__(self, visits_per_pixel, learn=True):
        super().__init__(visits_per_pixel or 0.0)
        self.off, self.learn, self.tiles = visits_per_pixel is None, learn, []

    def buffers(self, *args):
        if self.off:
            return compiled._NO_RECORD
        out = super().buffers(*args)
        self.tiles.append(out[0])
        return out

    def update(self, rec_used, num_pixels):
        if self.learn:
            super().update(rec_used, num_pixels)


@pytest.mark.parametrize("grad_to_geometry", [False, True])
def test_backward_from_the_recorded_visits_equals_recomputing_them(monkeypatch, grad_to_geometry):
    """The forward records its visits (pixel, alpha, exp(-sigma)) for the backward; a record too
    small leaves tiles unrecorded, whose backward recomputes the visits. All give the same bits as
    recomputing everything, and the size learnt from one pass records every tile of the next."""
    from trace3d_ns.rendering import rasterize_with_extra

    view, K = look_at((0.3, -0.4, 3.0)), intrinsics(W, H)
    wanted = torch.rand(1, H, W, generator=torch.Generator().manual_seed(5)) < 0.1

    def run(record):
        monkeypatch.setattr(compiled, "VISIT_RECORD", record)
        params = [p.requires_grad_(True) for p in random_gaussians(400, seed=21)]
        feats = torch.randn(400, 5, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        rgb, alpha, meta, extra = rasterize_with_extra(
            *params, view[None], K[None], W, H, extra_colors=feats, extra_grad_to_geometry=grad_to_geometry,
            backend="compiled", extra_pixels=wanted, absgrad=True,
        )
        meta["means2d"].retain_grad()
        (rgb.square().sum() + alpha.sum() + (extra ** 2).sum()).backward()
        return [rgb, extra, meta["means2d"].grad, meta["means2d"].absgrad] + [p.grad for p in params] + [feats.grad]

    reference = run(_Record(None))
    tiny, learning = _Record(0.5, learn=False), _Record(0.5)
    for record in (tiny, learning, learning):
        for a, b in zip(run(record), reference):
            assert torch.equal(a, b)
    partial = tiny.tiles[0]
    assert partial.any() and not partial.all()  # both paths ran in one backward
    assert not learning.tiles[0].all() and learning.tiles[1].all()  # W x H fills every tile here


def test_visit_record_takes_at_most_a_quarter_of_the_free_memory(monkeypatch):
    record = compiled._VisitRecord(visits_per_pixel=50.0)
    monkeypatch.setattr(compiled, "_available_bytes", lambda: 400_000)
    buffers = record.buffers(12, 1000, 64 * 48, 2)
    assert buffers[3].nbytes + buffers[4].nbytes + buffers[5].nbytes <= 100_000
    monkeypatch.setattr(compiled, "_available_bytes", lambda: None)  # the OS does not say: the fixed cap
    assert record.buffers(12, 1000, 64 * 48, 2)[3].shape[0] == 2 * int(1.25 * 50 * 64 * 48 / 2) + 2 * 256
