"""The contribution primitive (Gaussian, pixel, alpha*T) of Gaussian Instance Tracing."""

import pytest
import torch

from tests.gaussians import intrinsics, look_at, random_gaussians
from trace3d_ns.cuda.indices import rasterize_to_indices_in_range
from trace3d_ns.cuda.projection import project_gaussians
from trace3d_ns.cuda.rasterization import rasterization
from trace3d_ns.cuda.reference import reference_rasterize
from trace3d_ns.cuda.tiles import intersect_tiles
from trace3d_ns.rendering import contributions

W, H = 50, 35


def _scene(seed=0, n=300):
    return random_gaussians(n, seed=seed), look_at((0.4, -0.3, 3.0)), intrinsics(W, H)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_contributions_recompose_the_rendered_image(backend):
    (means, quats, scales, opac, colors), view, K = _scene()
    rgb, alpha, _ = rasterization(means, quats, scales, opac, colors, view[None], K[None], W, H, backend=backend)
    c = contributions(means, quats, scales, opac, view, K, W, H, backend=backend)
    assert len(c) > W * H  # several Gaussians per pixel on average
    image = torch.zeros(W * H, 3).index_add_(0, c.pixel_ids, c.weights[:, None] * colors[c.gaussian_ids])
    torch.testing.assert_close(image.reshape(H, W, 3), rgb[0], atol=1e-5, rtol=1e-5)
    acc = torch.zeros(W * H).index_add_(0, c.pixel_ids, c.weights)
    torch.testing.assert_close(acc.reshape(H, W, 1), alpha[0], atol=1e-5, rtol=1e-5)
    assert (c.weights > 0).all()
    # grouped by pixel, ascending
    assert (c.pixel_ids[1:] >= c.pixel_ids[:-1]).all()


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_contributions_equal_bruteforce_weights(backend):
    (means, quats, scales, opac, colors), view, K = _scene(seed=1)
    c = contributions(means, quats, scales, opac, view, K, W, H, backend=backend)
    with torch.no_grad():
        *_, dense = reference_rasterize(means, quats, scales, opac, colors, view, K, W, H, return_weights=True)
    pix, gid = dense.nonzero(as_tuple=True)
    ours = torch.zeros_like(dense)
    ours[c.pixel_ids, c.gaussian_ids] = c.weights
    assert torch.equal(ours > 0, dense > 0)  # exactly the same pairs
    torch.testing.assert_close(ours, dense, atol=1e-6, rtol=1e-4)
    assert pix.numel() == len(c)


def test_gpu_code_path_with_torch_twin_of_gsplat_indices():
    (means, quats, scales, opac, _), view, K = _scene(seed=2)
    cpu = contributions(means, quats, scales, opac, view, K, W, H)
    via_indices = contributions(means, quats, scales, opac, view, K, W, H, indices_fn=rasterize_to_indices_in_range)
    assert torch.equal(cpu.gaussian_ids, via_indices.gaussian_ids)
    assert torch.equal(cpu.pixel_ids, via_indices.pixel_ids)
    torch.testing.assert_close(cpu.weights, via_indices.weights)


def test_indices_in_range_resumes_from_transmittance():
    # Iterating depth batches, carrying T, gives the same pairs as one full pass (gsplat's contract)
    # where no pixel saturates (past a saturation, a resumed batch may go on where a full pass stops).
    (means, quats, scales, opac, _), view, K = _scene(seed=3, n=2500)
    opac = opac * 0.08
    proj = project_gaussians(means, quats, scales, view[None], K[None], W, H)
    isect = intersect_tiles(proj.means2d, proj.radii, proj.depths, 16, 4, 3)
    args = (proj.means2d, proj.conics, opac[None], W, H, 16, isect.isect_offsets, isect.flatten_ids)
    g_all, p_all, _ = rasterize_to_indices_in_range(0, 10**6, torch.ones(1, H, W), *args)
    max_per_tile = int(torch.bincount(isect.isect_ids >> 32).max())
    assert max_per_tile > 256  # several batches of 256 intersections per tile
    trans = torch.ones(1, H, W, dtype=torch.float64)  # carried exactly: no cut-off flips
    pieces = []
    for b in range(0, (max_per_tile + 255) // 256):
        g, p, _ = rasterize_to_indices_in_range(b, b + 1, trans, *args)
        pieces.append((g, p))
        if g.numel():
            from trace3d_ns.cuda.tiles import splat_alpha

            xy = torch.stack([(p % W).float() + 0.5, (p // W).float() + 0.5], -1)
            _, a = splat_alpha(proj.means2d[0][g], proj.conics[0][g], opac[g], xy[:, 0], xy[:, 1])
            keep = torch.ones(W * H, dtype=torch.float64).index_reduce_(0, p, 1 - a.double(), "prod")
            trans = trans * keep.reshape(1, H, W)
    assert trans.min() > 1e-4  # precondition: no pixel saturated
    g_cat = torch.cat([g for g, _ in pieces])
    p_cat = torch.cat([p for _, p in pieces])
    order = torch.argsort(p_cat, stable=True)
    assert torch.equal(p_cat[order], p_all)
    assert torch.equal(g_cat[order], g_all)


def test_footprint_enumeration_equals_tile_sweep():
    from trace3d_ns.cuda.tiles import contributing_pairs, contributing_pairs_tile_sweep, decode_isect_ids

    (means, quats, scales, opac, _), view, K = _scene(seed=4, n=3000)
    proj = project_gaussians(means, quats, scales, view[None], K[None], W, H)
    isect = intersect_tiles(proj.means2d, proj.radii, proj.depths, 16, 4, 3)
    _, tiles = decode_isect_ids(isect.isect_ids, 12)
    sweep = contributing_pairs_tile_sweep(
        proj.means2d[0], proj.conics[0], opac, isect.flatten_ids.long(), tiles, W, H, 16, 4, max_candidates=5000
    )
    fast = contributing_pairs(
        proj.means2d[0], proj.conics[0], opac, proj.radii[0], proj.depths[0], W, H, 16, max_candidates=5000
    )
    assert sweep[0].numel() > 10 * W * H
    assert torch.equal(sweep[0], fast[0]) and torch.equal(sweep[1], fast[1])


def test_fused_weights_equal_recomputed_pair_weights():
    # The no-grad trace path takes alpha * T from the cut-off pass; its twin is `pair_weights`.
    from trace3d_ns.cuda.rasterization import pair_weights
    from trace3d_ns.cuda.tiles import contributing_pairs

    (means, quats, scales, opac, _), view, K = _scene(seed=5, n=3000)  # dense: many pixels saturate
    proj = project_gaussians(means, quats, scales, view[None], K[None], W, H)
    args = (proj.means2d[0], proj.conics[0], opac, proj.radii[0], proj.depths[0], W, H, 16)
    gids, pids = contributing_pairs(*args, max_candidates=5000)
    g2, p2, w = contributing_pairs(*args, max_candidates=5000, return_weights=True)
    assert torch.equal(gids, g2) and torch.equal(pids, p2) and w.dtype == torch.float32
    ref = pair_weights(gids, pids, proj.means2d[0][gids], proj.conics[0], opac, W)
    torch.testing.assert_close(w, ref, atol=1e-7, rtol=1e-5)
    saturated = torch.zeros(W * H).index_add_(0, pids, w)
    assert saturated.max() > 0.999  # the transmittance cut-off is exercised


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_contributions_reject_batched_cameras_by_name(backend):
    (means, quats, scales, opac, _), view, K = _scene()
    with pytest.raises(ValueError, match=r"one view: viewmat \[4, 4\] and K \[3, 3\], got \[1, 4, 4\]"):
        contributions(means, quats, scales, opac, view[None], K[None], W, H, backend=backend)
