"""Tile binning and per-pixel contribution lists (no gradients), gsplat 1.4.0 semantics.

`intersect_tiles` produces gsplat's `isect_ids` / `flatten_ids` / `isect_offsets` (so the CPU
`info` matches what gsplat strategies and `rasterize_to_indices_in_range` consume), vectorized.
`contributing_pairs` lists, for one camera, every (Gaussian, pixel) pair the compositor uses:
alpha >= 1/255, sigma >= 0, in front of the point where transmittance would drop to <= 1e-4.
Pairs come grouped by pixel, front to back within a pixel (the layout of gsplat's
`rasterize_to_indices_in_range`), so both backends feed the same compositing code.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
TRANSMITTANCE_MIN = 1e-4


class TileIntersections(NamedTuple):
    tiles_per_gauss: Tensor  # [C, N] int32
    isect_ids: Tensor  # [M] int64: camera | tile | depth bits, sorted
    flatten_ids: Tensor  # [M] int32: c * N + n
    isect_offsets: Tensor  # [C, tile_height, tile_width] int32: first intersection of each tile


@torch.no_grad()
def intersect_tiles(
    means2d: Tensor,  # [C, N, 2]
    radii: Tensor,  # [C, N]
    depths: Tensor,  # [C, N]
    tile_size: int,
    tile_width: int,
    tile_height: int,
) -> TileIntersections:
    """Every (camera, tile, Gaussian) overlap of the Gaussians' square 3-sigma boxes, sorted by
    camera, tile, then depth (stable, so equal depths keep Gaussian order as gsplat's radix sort)."""
    C, N = radii.shape
    device = means2d.device
    centre = means2d.detach() / tile_size  # [C, N, 2]
    r = (radii / tile_size)[..., None]  # [C, N, 1]
    limits = torch.tensor([tile_width, tile_height], device=device)
    tmin = torch.minimum(torch.floor(centre - r).clamp(min=0).long(), limits)  # [C, N, 2]
    tmax = torch.minimum(torch.ceil(centre + r).clamp(min=0).long(), limits)  # [C, N, 2]
    extent = tmax - tmin  # [C, N, 2]
    counts = (extent[..., 0] * extent[..., 1]) * (radii > 0)  # [C, N]

    flat_counts = counts.reshape(-1)  # [C * N]
    owner = torch.repeat_interleave(torch.arange(C * N, device=device), flat_counts)  # [M]
    local = torch.arange(owner.numel(), device=device) - (torch.cumsum(flat_counts, 0) - flat_counts)[owner]
    box_w = extent.reshape(-1, 2)[owner, 0]
    tx = tmin.reshape(-1, 2)[owner, 0] + local % box_w
    ty = tmin.reshape(-1, 2)[owner, 1] + local // box_w
    tile_id = ty * tile_width + tx  # [M]
    cam_id = owner // N
    depth_bits = depths.detach().float().contiguous().view(torch.int32).reshape(-1)[owner].long() & 0xFFFFFFFF
    tile_bits = (tile_width * tile_height).bit_length()
    isect_ids = (cam_id << (32 + tile_bits)) | (tile_id << 32) | depth_bits
    isect_ids, order = torch.sort(isect_ids, stable=True)
    flatten_ids = owner[order].int()

    n_tiles = tile_height * tile_width
    cam_sorted, tile_sorted = decode_isect_ids(isect_ids, n_tiles)
    bin_counts = torch.bincount(cam_sorted * n_tiles + tile_sorted, minlength=C * n_tiles)  # [C * th * tw]
    offsets = (torch.cumsum(bin_counts, 0) - bin_counts).int().reshape(C, tile_height, tile_width)
    return TileIntersections(counts.int(), isect_ids, flatten_ids, offsets)


def decode_isect_ids(isect_ids: Tensor, n_tiles: int) -> tuple[Tensor, Tensor]:
    """(camera id, tile id) of gsplat-encoded intersection ids. [M] -> [M], [M]"""
    tile_bits = n_tiles.bit_length()
    return isect_ids >> (32 + tile_bits), (isect_ids >> 32) & ((1 << tile_bits) - 1)


def splat_alpha(
    means2d: Tensor,  # [P, 2]
    conics: Tensor,  # [P, 3]
    opacities: Tensor,  # [P]
    pixel_x: Tensor,  # [P] pixel centres (x + 0.5)
    pixel_y: Tensor,  # [P]
) -> tuple[Tensor, Tensor]:
    """Per-pair Gaussian falloff sigma and alpha = min(0.999, o * exp(-sigma))."""
    dx = means2d[..., 0] - pixel_x
    dy = means2d[..., 1] - pixel_y
    sigma = 0.5 * (conics[..., 0] * dx * dx + conics[..., 2] * dy * dy) + conics[..., 1] * dx * dy
    alpha = torch.clamp(opacities * torch.exp(-sigma), max=ALPHA_MAX)
    return sigma, alpha


def segment_starts(pixel_ids: Tensor) -> Tensor:
    """For pairs grouped by pixel: the index of the first pair of each pair's pixel. [P] -> [P]."""
    _, counts = torch.unique_consecutive(pixel_ids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts, counts)


def exclusive_transmittance(alphas: Tensor, pixel_ids: Tensor) -> Tensor:
    """T before each pair: the product of (1 - alpha) over earlier pairs of the same pixel.

    Pairs must be grouped by pixel in front-to-back order. Differentiable; the running sum of
    log(1 - alpha) is kept in float64 so segments far down the list lose no precision.
    """
    if alphas.numel() == 0:
        return alphas
    log_keep = torch.log1p(-alphas.double())  # [P]
    before = torch.cumsum(log_keep, 0) - log_keep  # [P] exclusive prefix over all pairs
    return torch.exp(before - before[segment_starts(pixel_ids)]).to(alphas.dtype)


@torch.no_grad()
def contributing_pairs_tile_sweep(
    means2d: Tensor,  # [N, 2] one camera
    conics: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    flatten_ids: Tensor,  # [M] this camera's sorted intersections, as indices into N
    tile_ids: Tensor,  # [M] tile of each intersection
    width: int,
    height: int,
    tile_size: int,
    tile_width: int,
    max_candidates: int = 1 << 23,
    initial_transmittance: Optional[Tensor] = None,  # [H*W] T in front of the listed Gaussians
) -> tuple[Tensor, Tensor]:
    """(gaussian_ids [P] int64, pixel_ids [P] int64) of every pair that the compositor uses,
    grouped by pixel (ascending row-major id), front to back within a pixel.

    Sweeps every pixel of every intersected tile, as gsplat's kernels do (the simple reference of
    `contributing_pairs`, and the core of the torch twin of `rasterize_to_indices_in_range`).
    Candidates are evaluated in chunks of at most `max_candidates` to bound memory.
    """
    device = means2d.device
    pix_in_tile = torch.arange(tile_size * tile_size, device=device)
    qx, qy = pix_in_tile % tile_size, pix_in_tile // tile_size  # [S]
    num_isect = flatten_ids.numel()
    chunk = max(1, max_candidates // pix_in_tile.numel())
    keep_isect, keep_pix, keep_alpha = [], [], []
    for start in range(0, num_isect, chunk):
        gid = flatten_ids[start : start + chunk].long()  # [m]
        tile = tile_ids[start : start + chunk]  # [m]
        x = (tile % tile_width * tile_size)[:, None] + qx  # [m, S]
        y = (tile // tile_width * tile_size)[:, None] + qy  # [m, S]
        sigma, alpha = splat_alpha(
            means2d[gid][:, None], conics[gid][:, None], opacities[gid][:, None], x + 0.5, y + 0.5
        )
        keep = (x < width) & (y < height) & (sigma >= 0) & (alpha >= ALPHA_MIN)  # [m, S]
        m_idx, s_idx = keep.nonzero(as_tuple=True)
        keep_isect.append(m_idx + start)
        keep_pix.append(y[m_idx, s_idx] * width + x[m_idx, s_idx])
        keep_alpha.append(alpha[m_idx, s_idx])
    if not keep_isect:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    isect = torch.cat(keep_isect)
    pix = torch.cat(keep_pix)
    alpha = torch.cat(keep_alpha)

    # Group by pixel; the intersection index is already in depth order within a tile.
    order = torch.argsort(pix * max(num_isect, 1) + isect)
    isect, pix, alpha = isect[order], pix[order], alpha[order]

    used = _before_saturation(alpha, pix, initial_transmittance)
    return flatten_ids[isect[used]].long(), pix[used]


def _before_saturation(alpha: Tensor, pixel_ids: Tensor, initial_transmittance: Optional[Tensor] = None) -> Tensor:
    """Mask of the pairs composited before a pixel's transmittance would drop to <= 1e-4
    (compared in log space: log T after the pair > log 1e-4)."""
    return _saturation_and_transmittance(alpha, pixel_ids, initial_transmittance)[0]


SATURATION_CHUNK = 1 << 21
"""Pairs per block of the saturation pass (blocks end at pixel boundaries): its float64 prefix
sums cost about 50 bytes per pair, so a view's pass is done in blocks, not all at once."""


def _saturation_and_transmittance(
    alpha: Tensor, pixel_ids: Tensor, initial_transmittance: Optional[Tensor] = None, chunk: int = SATURATION_CHUNK
) -> tuple[Tensor, Tensor]:
    """(mask of `_before_saturation`, log T before each pair [P] float64): the same exclusive
    prefix as `exclusive_transmittance`, so alpha * exp(log T) is the compositing weight. Pairs are
    grouped by ascending pixel; they are processed in blocks of about `chunk` pairs cut at pixel
    boundaries (every pixel's prefix starts at its first pair, so blocks are independent)."""
    if alpha.numel() == 0:
        return torch.zeros_like(alpha, dtype=torch.bool), alpha.double()
    if alpha.numel() > chunk:
        cuts = torch.searchsorted(pixel_ids, pixel_ids[chunk :: chunk])  # first pair of the pixel at each cut
        bounds = [0, *sorted(set(cuts.tolist()) - {0}), alpha.numel()]
        parts = [
            _saturation_and_transmittance(alpha[a:b], pixel_ids[a:b], initial_transmittance, chunk=b - a)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat([m for m, _ in parts]), torch.cat([t for _, t in parts])
    log_keep = torch.log1p(-alpha.double())  # [P]
    after = torch.cumsum(log_keep, 0)  # [P] inclusive prefix over all pairs
    before = after - log_keep  # [P] exclusive prefix
    start = before[segment_starts(pixel_ids)]  # [P]
    log_t_after = after - start
    log_t_before = before - start
    if initial_transmittance is not None:
        log_t0 = torch.log(initial_transmittance[pixel_ids].double())
        log_t_after, log_t_before = log_t_after + log_t0, log_t_before + log_t0
    return log_t_after > math.log(TRANSMITTANCE_MIN), log_t_before


@torch.no_grad()
def contributing_pairs(
    means2d: Tensor,  # [N, 2] one camera
    conics: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    radii: Tensor,  # [N] 0 = culled
    depths: Tensor,  # [N]
    width: int,
    height: int,
    tile_size: int,
    max_candidates: int = 1 << 20,
    return_weights: bool = False,
) -> tuple[Tensor, ...]:
    """Same output as `contributing_pairs_tile_sweep`, found faster.

    With `return_weights`, also the blending weight alpha * T [P] float32 of every pair, from the
    alpha and transmittance already computed for the cut-offs (what `pair_weights` recomputes
    differentiably; equal up to float rounding of the running log-sum), for the no-grad callers
    (Gaussian Instance Tracing).

    Instead of every pixel of every intersected tile, each Gaussian is tested only on the pixels
    of its own footprint: the disc where alpha can still reach 1/255 (|d|^2 <= 2 ln(255 o) lambda_max),
    clipped to its 3-sigma tile box (so the tile semantics are kept exactly). Gaussians are taken
    in depth order (stable, as gsplat's per-tile sort), so sorting pairs by pixel keeps each pixel's
    list front to back.
    """
    device = means2d.device
    n_tiles_x, n_tiles_y = -(-width // tile_size), -(-height // tile_size)
    a, b, c = conics.unbind(-1)
    det = (a * c - b * b).clamp(min=1e-20)
    half_trace = 0.5 * (a + c) / det  # of the covariance, the conic's inverse
    lambda_max = half_trace + torch.sqrt((half_trace**2 - 1.0 / det).clamp(min=0.0))
    reach = torch.sqrt(2.0 * torch.log((255.0 * opacities).clamp(min=1.0)) * lambda_max)  # [N] pixels

    order = torch.argsort(depths, stable=True)
    order = order[(radii[order] > 0) & (255.0 * opacities[order] >= 1.0)]
    mean = means2d[order]  # [G, 2]
    tile_lo = torch.floor(mean / tile_size - (radii[order] / tile_size)[:, None]).clamp(min=0)
    tile_hi = torch.ceil(mean / tile_size + (radii[order] / tile_size)[:, None])
    tile_hi = torch.minimum(tile_hi, torch.tensor([n_tiles_x, n_tiles_y], device=device))
    lo = torch.maximum(tile_lo * tile_size, torch.ceil(mean - reach[order, None] - 0.5)).long()  # [G, 2]
    hi = torch.minimum(
        torch.minimum(tile_hi * tile_size, torch.tensor([width, height], device=device)),
        torch.floor(mean + reach[order, None] - 0.5) + 1,
    ).long()  # [G, 2] exclusive
    extent = (hi - lo).clamp(min=0)
    counts = extent[:, 0] * extent[:, 1]  # [G]

    # per depth rank: [x0, y0, box width, mean x, mean y, conic a, b, c, opacity] in one table, one gather per candidate
    table = torch.cat(
        [lo.to(means2d.dtype), extent[:, :1].to(means2d.dtype), mean, conics[order], opacities[order, None]], dim=1
    )  # [G, 9]
    keep_rank, keep_pix, keep_alpha = [], [], []
    ends = torch.cumsum(counts, 0)
    start_g = 0
    while start_g < order.numel():
        budget_end = int(torch.searchsorted(ends, ends[start_g] - counts[start_g] + max_candidates, right=True))
        stop_g = max(start_g + 1, min(budget_end, order.numel()))
        cnt = counts[start_g:stop_g]
        rank = torch.repeat_interleave(torch.arange(start_g, stop_g, device=device), cnt)  # [m]
        local = torch.arange(rank.numel(), device=device) - (torch.cumsum(cnt, 0) - cnt).repeat_interleave(cnt)
        t = table[rank]  # [m, 9]
        row = torch.div(local, t[:, 2].long(), rounding_mode="floor")
        x = t[:, 0].long() + local - row * t[:, 2].long()
        y = t[:, 1].long() + row
        sigma, alpha = splat_alpha(t[:, 3:5], t[:, 5:8], t[:, 8], x + 0.5, y + 0.5)
        keep = (sigma >= 0) & (alpha >= ALPHA_MIN)
        keep_rank.append(rank[keep].int())  # depth rank < N < 2**31
        keep_pix.append((y * width + x)[keep].int())
        keep_alpha.append(alpha[keep])
        start_g = stop_g
    if not keep_rank:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return (empty, empty, means2d.new_zeros(0)) if return_weights else (empty, empty)
    rank, pix, alpha = torch.cat(keep_rank), torch.cat(keep_pix), torch.cat(keep_alpha)
    del keep_rank, keep_pix, keep_alpha, t, x, y, row, local, sigma, keep  # the last chunk's candidates
    del table, lo, hi, extent, counts, ends, tile_lo, tile_hi, mean  # [G]-sized
    # candidates are in depth-rank order, so a stable sort by pixel keeps each pixel's list front to back
    pix, by_pixel = torch.sort(pix, stable=True)
    rank, alpha = rank[by_pixel], alpha[by_pixel]
    del by_pixel
    if not return_weights:
        used = _before_saturation(alpha, pix)
        return order[rank[used]], pix[used].long()
    used, log_t = _saturation_and_transmittance(alpha, pix)
    weights = alpha[used] * torch.exp(log_t[used]).to(alpha.dtype)
    return order[rank[used]], pix[used].long(), weights


def sum_pairs_by_patch(gaussian_ids: Tensor, labels: Tensor, weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Sum per-pair weights per (Gaussian, patch): (gaussian [U], patch [U], weight [U]) sorted by
    Gaussian then patch (exact: sorted unique keys, then a scatter-add)."""
    num_labels = int(labels.max()) + 1 if labels.numel() else 1
    keys, inverse = torch.unique(gaussian_ids * num_labels + labels, return_inverse=True)  # [U], [P]
    sums = torch.zeros(keys.numel(), dtype=torch.float64, device=weights.device).index_add_(0, inverse, weights.double())
    return torch.div(keys, num_labels, rounding_mode="floor"), keys % num_labels, sums.float()
