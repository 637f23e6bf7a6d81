"""Compiled (numba) CPU compositing kernels with gsplat 1.4.0's per-tile semantics.

Work is split over 16x16 tiles, interleaved over the threads (`prange` over workers, worker w taking
tiles w, w + workers, ...: contiguous halves would leave one core idle when the scene fills one half). Within a tile, Gaussians are visited in
the tile's depth order, and each one only on the pixels of its own footprint: the ellipse where
alpha can still reach 1/255 (sigma <= ln(255 o), with a margin), row by row, clipped to the tile. Every pixel keeps its transmittance T (float64) and a done flag; a tile stops once all
its pixels are done. The chords of a Gaussian's rows are found before its pixels are visited: they
do not depend on one another, so the CPU overlaps their square roots instead of waiting on each
before a row's pixels (10% of the forward). Per (Gaussian, pixel):

    sigma = 0.5 (a dx^2 + c dy^2) + b dx dy      dx = mean_x - (x + 0.5), float32 as gsplat
    alpha = min(0.999, o exp(-sigma))            skipped when sigma < 0 or alpha < 1/255
    stop (pixel done, pair not used) when T (1 - alpha) <= 1e-4, else composite alpha T.

`footprints` bounds, per Gaussian, the pixels worth testing. One kernel walks front to back (`composite_tiles`) and does, by `mode`, the render, or counts /
fills the (Gaussian, pixel, alpha T) pairs, or counts / fills the per-(tile entry, patch) sums
that Gaussian Instance Tracing needs. `backward_tiles` walks back to front as gsplat's backward
kernel does and writes gradients per tile entry (each entry belongs to one tile: no races), which
the caller reduces per Gaussian. In render mode the forward can record every composited visit
(tile pixel, alpha, exp(-sigma)) so that the backward walks those instead of recomputing chords,
sigma and exp; a tile that did not fit in its worker's part of the record is recomputed. It can also
list its visits at a few requested pixels (pixel, Gaussian, alpha T): channels that a loss reads only
there and whose gradients stay off the geometry (features) are then summed from that list
(`weighted_rows`) instead of riding through every tile as extra channels.

Layout: the C cameras' tiles are numbered c * tiles_per_camera + ty * tile_width + tx, and the
per-camera arrays are flattened over (camera, Gaussian), so `flatten_ids` index them directly.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

MODE_RENDER = 0
MODE_COUNT_PAIRS = 1
MODE_FILL_PAIRS = 2
MODE_COUNT_PATCHES = 3
MODE_FILL_PATCHES = 4

_HALF = np.float32(0.5)
_ALPHA_MIN = np.float32(1.0 / 255.0)
_ALPHA_MAX = np.float32(0.999)
_T_MIN = 1e-4
ENTRY_GRADS = 8
"""`backward_tiles`' per-entry row: d means2d (2), d conics (3), d opacity, |d means2d| summed over
pixels (absgrad, 2), then d colours (K)."""


@njit(parallel=True, cache=True)
def footprints(
    means2d,  # [CN, 2] float32
    conics,  # [CN, 3] float32
    opacities,  # [CN] float32
):
    """Per Gaussian, the ellipse sigma <= limit that holds every pixel where alpha = o exp(-sigma)
    can reach 1/255 (limit = ln(255 o) plus a margin covering float32 rounding; the kernels decide
    on the float32 alpha itself), as [CN, 4] float64: (max |dy| on it, or -1 when the Gaussian
    cannot contribute anywhere; b^2 - a c; 2 a limit; 1 / a). Row y's chord is then
    dx = mean_x - (x + 0.5) in [(-b dy - r) / a, (-b dy + r) / a], r^2 = (b^2 - a c) dy^2 + 2 a limit."""
    n = opacities.shape[0]
    out = np.empty((n, 4))
    for g in prange(n):
        a, b, c, o = np.float64(conics[g, 0]), np.float64(conics[g, 1]), np.float64(conics[g, 2]), np.float64(opacities[g])
        det = a * c - b * b
        out[g, 0] = -1.0
        if det > 0.0 and a > 0.0 and o * 255.0 >= 1.0 and math.isfinite(means2d[g, 0]) and math.isfinite(means2d[g, 1]):
            limit = math.log(255.0 * o)
            limit += 1e-4 * limit + 1e-3
            half = math.sqrt(2.0 * limit * a / det)
            if math.isfinite(half):
                out[g, 0] = half
                out[g, 1] = b * b - a * c
                out[g, 2] = 2.0 * a * limit
                out[g, 3] = 1.0 / a
    return out


@njit(cache=True, inline="always")
def _rows(my, half, y0, y1):
    """Rows [ry0, ry1) of the tile rows [y0, y1) that the footprint ellipse reaches."""
    lo = math.ceil(my - half - 0.5)
    hi = math.floor(my + half - 0.5) + 1.0
    ry0 = y0 if lo < y0 else (y1 if lo > y1 else int(lo))
    ry1 = y0 if hi < y0 else (y1 if hi > y1 else int(hi))
    return ry0, ry1


@njit(cache=True, inline="always")
def _columns(mx, my, b, fp, y, x0, x1):
    """Columns [cx0, cx1) of row y within [x0, x1) inside the footprint ellipse (its chord)."""
    dy = my - (y + 0.5)
    disc = fp[1] * dy * dy + fp[2]
    if not (disc >= 0.0):
        return x0, x0
    root = math.sqrt(disc)
    lo = math.ceil(mx - (-b * dy + root) * fp[3] - 0.5)
    hi = math.floor(mx - (-b * dy - root) * fp[3] - 0.5) + 1.0
    cx0 = x0 if lo < x0 else (x1 if lo > x1 else int(lo))
    cx1 = x0 if hi < x0 else (x1 if hi > x1 else int(hi))
    return cx0, cx1


@njit(cache=True, inline="always")
def _alpha(mx, my, a, b, c, o, x, y):
    """(sigma, vis = exp(-sigma), alpha) of one Gaussian at pixel (x, y), in float32 like gsplat."""
    dx = mx - (np.float32(x) + _HALF)
    dy = my - (np.float32(y) + _HALF)
    sigma = _HALF * (a * dx * dx + c * dy * dy) + b * dx * dy
    vis = np.float32(math.exp(-sigma))
    alpha = o * vis
    if alpha > _ALPHA_MAX:
        alpha = _ALPHA_MAX
    return dx, dy, sigma, vis, alpha


@njit(cache=True, inline="always")
def _tile_box(t, width, height, tile_size, tile_width, tiles_per_camera):
    """Camera of tile t and its pixel box [x0, x1) x [y0, y1)."""
    cam = t // tiles_per_camera
    local_tile = t - cam * tiles_per_camera
    x0 = (local_tile % tile_width) * tile_size
    y0 = (local_tile // tile_width) * tile_size
    return cam, x0, y0, min(x0 + tile_size, width), min(y0 + tile_size, height)


@njit(parallel=True, cache=True)
def composite_tiles(
    mode,  # int: MODE_*
    means2d,  # [CN, 2] float32
    conics,  # [CN, 3] float32
    opacities,  # [CN] float32
    footprint,  # [CN, 4] float64 (`footprints`)
    colors,  # [CN, K] float32 (render)
    backgrounds,  # [C, K] float32 (render)
    tile_starts,  # [T + 1] int64 first entry of each tile
    flatten_ids,  # [M] int32 index into the CN arrays, per tile in depth order
    width,
    height,
    tile_size,
    tile_width,
    tiles_per_camera,
    num_gaussians,  # N: pair / patch outputs (and the render's visit list) report flatten_id % N
    patch_map,  # [C * H * W] int32 patch of each pixel (patch modes)
    out_colors,  # [C * H * W, K] float32 (render)
    out_transmittance,  # [C * H * W] float64 final T (render)
    out_last,  # [C * H * W] int32 last composited entry, -1 if none (render)
    counts,  # [C * H * W] int64 pairs per pixel (count pairs) / [M] patches per entry (count patches)
    offsets,  # [C * H * W] or [M] int64: write position (fill modes)
    out_gaussian,  # [P] int64 (fill modes)
    out_index,  # [P] int64 pixel id c * H * W + y * W + x, or patch id (fill modes)
    out_weight,  # [P] float32 alpha * T, or its sum over the entry's pixels in the patch (fill modes)
    workers,  # parallel workers (threads): each takes every workers-th tile
    sparse_from,  # channels [sparse_from, K) are composited only at `sparse_pixels` (render)
    sparse_pixels,  # [C * H * W] bool, or empty: those channels everywhere (render)
    rec_tile,  # [T] bool out: the tile's visits are recorded (render), or empty: record nothing
    rec_start,  # [M] int64 out: first recorded visit of each entry
    rec_count,  # [M] int32 out: recorded visits of each entry
    rec_pixel,  # [workers * capacity] uint16 out: pixel of the visit within its tile
    rec_alpha,  # [workers * capacity] float32 out: its alpha
    rec_vis,  # [workers * capacity] float32 out: its exp(-sigma)
    rec_used,  # [workers] int64 out: visits each worker composited (recorded or not)
    pair_pixel,  # [workers * capacity] int64 out: pixel id of each composited visit at `sparse_pixels` (render), or empty
    pair_entry,  # [workers * capacity] int64 out: its Gaussian (flatten id % num_gaussians)
    pair_weight,  # [workers * capacity] float32 out: its alpha * T
    pair_used,  # [workers] int64 out: such visits per worker (those beyond its capacity are counted, not written)
):
    num_tiles = tile_starts.shape[0] - 1
    K = colors.shape[1]
    dense = sparse_from if sparse_pixels.shape[0] > 0 else K  # channels composited at every pixel
    pixels_per_camera = width * height
    record = mode == MODE_RENDER and rec_tile.shape[0] > 0
    capacity = rec_pixel.shape[0] // workers if record else 0
    pairs = mode == MODE_RENDER and pair_used.shape[0] > 0 and sparse_pixels.shape[0] > 0
    pair_capacity = pair_pixel.shape[0] // workers if pairs else 0
    for worker in prange(workers):  # it takes tiles worker, worker + workers, ...: both halves of the image
        pos = worker * capacity  # its part of the record: [worker * capacity, (worker + 1) * capacity)
        end = pos + capacity
        used = 0
        pair_base = worker * pair_capacity
        pair_n = 0
        for t in range(worker, num_tiles, workers):
            cam, x0, y0, x1, y1 = _tile_box(t, width, height, tile_size, tile_width, tiles_per_camera)
            tw = x1 - x0
            npix = tw * (y1 - y0)
            if record:
                rec_tile[t] = False
                for e in range(tile_starts[t], tile_starts[t + 1]):
                    rec_count[e] = 0
            if npix <= 0:
                continue
            tile_pos = pos
            keep = record  # the tile's visits still fit
            T = np.ones(npix, dtype=np.float64)
            done = np.zeros(npix, dtype=np.bool_)
            acc = np.zeros((npix, K if mode == MODE_RENDER else 0), dtype=np.float32)
            last = np.full(npix, -1, dtype=np.int32)
            fill = np.zeros(npix, dtype=np.int64)  # pairs written per pixel (fill pairs)
            patch_ids = np.empty(npix, dtype=np.int32)  # distinct patches of one entry (patch modes)
            patch_w = np.empty(npix, dtype=np.float64)
            remaining = npix
            pix_base = cam * pixels_per_camera
            chord = np.empty((tile_size, 2), dtype=np.int64)  # [rows, 2] columns [cx0, cx1) of each row
            for e in range(tile_starts[t], tile_starts[t + 1]):
                if remaining == 0:
                    break
                g = flatten_ids[e]
                mx, my = means2d[g, 0], means2d[g, 1]
                a, b, c = conics[g, 0], conics[g, 1], conics[g, 2]
                o = opacities[g]
                fp = footprint[g]
                if fp[0] < 0.0:
                    continue
                c0 = c1 = c2 = np.float32(0.0)
                if mode == MODE_RENDER and dense == 3:
                    c0, c1, c2 = colors[g, 0], colors[g, 1], colors[g, 2]
                ry0, ry1 = _rows(my, fp[0], y0, y1)
                n_patches = 0
                if keep:
                    rec_start[e] = pos
                for y in range(ry0, ry1):
                    chord[y - y0, 0], chord[y - y0, 1] = _columns(mx, my, b, fp, y, x0, x1)
                for y in range(ry0, ry1):
                    cx0 = chord[y - y0, 0]
                    cx1 = chord[y - y0, 1]
                    for x in range(cx0, cx1):
                        i = (y - y0) * tw + (x - x0)
                        if done[i]:
                            continue
                        dx, dy, sigma, vis, alpha = _alpha(mx, my, a, b, c, o, x, y)
                        if sigma < 0.0 or alpha < _ALPHA_MIN:
                            continue
                        next_t = T[i] * (1.0 - alpha)
                        if next_t <= _T_MIN:
                            done[i] = True
                            remaining -= 1
                            continue
                        w = alpha * T[i]
                        pid = pix_base + y * width + x
                        if mode == MODE_RENDER:
                            wf = np.float32(w)
                            if dense == 3:  # RGB: the colour stays in registers
                                acc[i, 0] += wf * c0
                                acc[i, 1] += wf * c1
                                acc[i, 2] += wf * c2
                            else:
                                for k in range(dense):
                                    acc[i, k] += wf * colors[g, k]
                            if dense < K and sparse_pixels[pid]:
                                for k in range(dense, K):
                                    acc[i, k] += wf * colors[g, k]
                            if pairs and sparse_pixels[pid]:
                                if pair_n < pair_capacity:
                                    pair_pixel[pair_base + pair_n] = pid
                                    pair_entry[pair_base + pair_n] = g % num_gaussians
                                    pair_weight[pair_base + pair_n] = wf
                                pair_n += 1
                            last[i] = e
                            if keep:
                                if pos < end:
                                    rec_pixel[pos] = i
                                    rec_alpha[pos] = alpha
                                    rec_vis[pos] = vis
                                    pos += 1
                                else:
                                    keep = False
                            used += 1
                        elif mode == MODE_COUNT_PAIRS:
                            counts[pid] += 1
                        elif mode == MODE_FILL_PAIRS:
                            p = offsets[pid] + fill[i]
                            fill[i] += 1
                            out_gaussian[p] = g % num_gaussians
                            out_index[p] = pid
                            out_weight[p] = w
                        else:  # patch modes: sum per distinct patch of this entry
                            label = patch_map[pid]
                            j = 0
                            while j < n_patches and patch_ids[j] != label:
                                j += 1
                            if j == n_patches:
                                patch_ids[j] = label
                                patch_w[j] = 0.0
                                n_patches += 1
                            patch_w[j] += w
                        T[i] = next_t
                if keep:
                    rec_count[e] = pos - rec_start[e]
                if mode == MODE_COUNT_PATCHES:
                    counts[e] = n_patches
                elif mode == MODE_FILL_PATCHES:
                    for j in range(n_patches):
                        p = offsets[e] + j
                        out_gaussian[p] = g % num_gaussians
                        out_index[p] = patch_ids[j]
                        out_weight[p] = patch_w[j]
            if record:
                rec_tile[t] = keep
                if not keep:  # the next tiles may fit in the space this one did not
                    pos = tile_pos
            if mode == MODE_RENDER:
                for y in range(y0, y1):
                    for x in range(x0, x1):
                        i = (y - y0) * tw + (x - x0)
                        pid = pix_base + y * width + x
                        for k in range(K):
                            out_colors[pid, k] = acc[i, k] + np.float32(T[i]) * backgrounds[cam, k]
                        out_transmittance[pid] = T[i]
                        out_last[pid] = last[i]
        if record:
            rec_used[worker] = used
        if pairs:
            pair_used[worker] = pair_n


@njit(cache=True, inline="always")
def _visit_grads(
    i, g, dx, dy, alpha, vis, a, b, c, o, colors, G, K, T, t_v, v_out, behind, extra, v_entry,
    gm0, gm1, gc0, gc1, gc2, go, ga0, ga1,
):
    """One (Gaussian g, tile pixel i) visit of `backward_tiles`, back to front: un-composites the
    pixel's T, adds the colour gradient to `v_entry` and returns the entry's geometry sums
    (d means2d, d conics, d opacity, absgrad) with this visit's share added."""
    ra = 1.0 / (1.0 - alpha)
    t_before = T[i] * ra
    w = alpha * t_before
    v_alpha = t_v[i] * ra
    for k in range(G):
        v = v_out[i, k]
        col = colors[g, k]
        v_alpha += (col * t_before - behind[i, k] * ra) * v
        behind[i, k] += col * w
    for k in range(G):
        v_entry[k] += w * v_out[i, k]
    if extra[i]:  # e.g. features whose loss samples a few pixels: the rest add 0
        for k in range(G, K):
            v_entry[k] += w * v_out[i, k]
    T[i] = t_before
    if o * vis <= _ALPHA_MAX:  # alpha not clamped: gradients reach sigma and opacity
        v_sigma = -o * vis * v_alpha
        gc0 += 0.5 * v_sigma * dx * dx
        gc1 += v_sigma * dx * dy
        gc2 += 0.5 * v_sigma * dy * dy
        vx = v_sigma * (a * dx + b * dy)
        vy = v_sigma * (b * dx + c * dy)
        gm0 += vx
        gm1 += vy
        ga0 += abs(vx)
        ga1 += abs(vy)
        go += vis * v_alpha
    return gm0, gm1, gc0, gc1, gc2, go, ga0, ga1


@njit(parallel=True, cache=True)
def backward_tiles(
    means2d,  # [CN, 2] float32
    conics,  # [CN, 3] float32
    opacities,  # [CN] float32
    footprint,  # [CN, 4] float64 (`footprints`)
    colors,  # [CN, K] float32
    backgrounds,  # [C, K] float32
    tile_starts,  # [T + 1] int64
    flatten_ids,  # [M] int32
    width,
    height,
    tile_size,
    tile_width,
    tiles_per_camera,
    geometry_channels,  # channels [0, geometry_channels) pass gradients to alpha (and so to geometry)
    transmittance,  # [C * H * W] float64 final T of the forward pass
    last,  # [C * H * W] int32 last composited entry
    v_colors_out,  # [C * H * W, K] float32 dL/d render
    v_alphas_out,  # [C * H * W] float32 dL/d render alpha
    v_entries,  # [M, ENTRY_GRADS + K] float32 out, per tile entry: every row written (zeros where unused)
    workers,  # parallel workers (threads): each takes every workers-th tile
    sparse_from,  # channels [sparse_from, K) were composited only at `sparse_pixels`
    sparse_pixels,  # [C * H * W] bool, or empty: everywhere
    rec_tile,  # [T] bool: `composite_tiles` recorded the tile's visits, or empty: none recorded
    rec_start,  # [M] int64
    rec_count,  # [M] int32
    rec_pixel,  # [R] uint16
    rec_alpha,  # [R] float32
    rec_vis,  # [R] float32
):
    num_tiles = tile_starts.shape[0] - 1
    K = colors.shape[1]
    pixels_per_camera = width * height
    for w in prange(workers):  # worker w takes tiles w, w + workers, ...: both halves of the image
        for t in range(w, num_tiles, workers):
            cam, x0, y0, x1, y1 = _tile_box(t, width, height, tile_size, tile_width, tiles_per_camera)
            tw = x1 - x0
            npix = tw * (y1 - y0)
            if npix <= 0:
                continue
            pix_base = cam * pixels_per_camera
            G = geometry_channels
            recorded = rec_tile.shape[0] > 0 and rec_tile[t]
            # per-pixel state, local to the tile
            T = np.empty(npix, dtype=np.float64)  # T in front of the Gaussian being visited
            t_v = np.empty(npix, dtype=np.float64)  # T_final (dL/d alpha_out - background . dL/d colour)
            last_local = np.empty(npix, dtype=np.int64)
            v_out = np.empty((npix, K), dtype=np.float32)  # dL/d render
            extra = np.zeros(npix, dtype=np.bool_)  # some channel >= G has a gradient at the pixel
            behind = np.zeros((npix, G), dtype=np.float64)  # colour composited behind the visited Gaussian
            v_entry = np.empty(K, dtype=np.float64)  # colour gradient of the visited Gaussian
            last_entry = np.int64(-1)
            chord = np.empty((tile_size, 2), dtype=np.int64)  # [rows, 2] columns [cx0, cx1) of each row
            for y in range(y0, y1):
                for x in range(x0, x1):
                    i = (y - y0) * tw + (x - x0)
                    pid = pix_base + y * width + x
                    T[i] = transmittance[pid]
                    s = 0.0
                    sparse_here = sparse_pixels.shape[0] == 0 or sparse_pixels[pid]
                    for k in range(K):
                        v_out[i, k] = v_colors_out[pid, k]
                        if k >= sparse_from and not sparse_here:
                            v_out[i, k] = 0.0  # a channel not composited here: its render is no function of the Gaussians
                        if k < G:
                            s += backgrounds[cam, k] * v_out[i, k]
                        elif v_out[i, k] != 0.0:
                            extra[i] = True
                    t_v[i] = transmittance[pid] * (v_alphas_out[pid] - s)
                    last_local[i] = last[pid]
                    if last[pid] > last_entry:
                        last_entry = last[pid]
            for e in range(max(last_entry + 1, tile_starts[t]), tile_starts[t + 1]):
                v_entries[e, :] = 0.0  # behind every pixel's last composited Gaussian
            for e in range(last_entry, tile_starts[t] - 1, -1):
                g = flatten_ids[e]
                mx, my = means2d[g, 0], means2d[g, 1]
                a, b, c = conics[g, 0], conics[g, 1], conics[g, 2]
                o = opacities[g]
                fp = footprint[g]
                if fp[0] < 0.0:
                    v_entries[e, :] = 0.0
                    continue
                gm0 = 0.0
                gm1 = 0.0
                ga0 = 0.0
                ga1 = 0.0
                gc0 = 0.0
                gc1 = 0.0
                gc2 = 0.0
                go = 0.0
                v_entry[:] = 0.0
                if recorded:  # the forward's visits of this entry: no footprint, sigma or exp again
                    for j in range(rec_start[e], rec_start[e] + rec_count[e]):
                        i = np.int64(rec_pixel[j])
                        y = y0 + i // tw
                        x = x0 + i - (y - y0) * tw
                        dx = mx - (np.float32(x) + _HALF)
                        dy = my - (np.float32(y) + _HALF)
                        gm0, gm1, gc0, gc1, gc2, go, ga0, ga1 = _visit_grads(
                            i, g, dx, dy, rec_alpha[j], rec_vis[j], a, b, c, o, colors, G, K, T, t_v, v_out, behind,
                            extra, v_entry, gm0, gm1, gc0, gc1, gc2, go, ga0, ga1,
                        )
                else:
                    ry0, ry1 = _rows(my, fp[0], y0, y1)
                    for y in range(ry0, ry1):
                        chord[y - y0, 0], chord[y - y0, 1] = _columns(mx, my, b, fp, y, x0, x1)
                    for y in range(ry0, ry1):
                        cx0 = chord[y - y0, 0]
                        cx1 = chord[y - y0, 1]
                        row = (y - y0) * tw - x0
                        for x in range(cx0, cx1):
                            i = row + x
                            if e > last_local[i]:
                                continue
                            dx, dy, sigma, vis, alpha = _alpha(mx, my, a, b, c, o, x, y)
                            if sigma < 0.0 or alpha < _ALPHA_MIN:
                                continue
                            gm0, gm1, gc0, gc1, gc2, go, ga0, ga1 = _visit_grads(
                                i, g, dx, dy, alpha, vis, a, b, c, o, colors, G, K, T, t_v, v_out, behind,
                                extra, v_entry, gm0, gm1, gc0, gc1, gc2, go, ga0, ga1,
                            )
                row_out = v_entries[e]
                row_out[0] = gm0
                row_out[1] = gm1
                row_out[2] = gc0
                row_out[3] = gc1
                row_out[4] = gc2
                row_out[5] = go
                row_out[6] = ga0
                row_out[7] = ga1
                for k in range(K):
                    row_out[ENTRY_GRADS + k] = v_entry[k]


@njit(parallel=True, cache=True)
def reduce_entries(
    flatten_ids,  # [M] int32 flattened (camera, Gaussian) of every tile entry
    per_entry,  # [M, D] float32
    num_rows,  # CN
    num_chunks,  # parallel chunks (threads)
):
    """[CN, D] float32: the rows of `per_entry` summed per flattened Gaussian, in entry order (so
    the sums do not depend on the thread count). Each chunk owns a range of Gaussians and scans
    every entry, keeping those in its range: no two chunks write the same row."""
    M, D = per_entry.shape
    out = np.zeros((num_rows, D), dtype=np.float32)
    step = (num_rows + num_chunks - 1) // num_chunks
    for chunk in prange(num_chunks):
        lo = chunk * step
        hi = min(lo + step, num_rows)
        for e in range(M):
            g = flatten_ids[e]
            if g >= lo and g < hi:
                for d in range(D):
                    out[g, d] += per_entry[e, d]
    return out


@njit(cache=True)
def weighted_rows(
    index_out,  # [P] int64 row of the output each pair adds to
    index_in,  # [P] int64 row of `source` it reads
    weight,  # [P] float32
    source,  # [R, E] float32
    num_out,  # output rows
):
    """[num_out, E] float32: out[index_out[k]] += weight[k] * source[index_in[k]] over the pairs k, in
    order. Channels composited from a visit list with fixed weights (features at a loss's sampled
    pixels, `compiled.composite(sparse_pairs=True)`), and with the indices swapped its gradient."""
    E = source.shape[1]
    out = np.zeros((num_out, E), dtype=np.float32)
    for k in range(index_out.shape[0]):
        o = index_out[k]
        i = index_in[k]
        w = weight[k]
        for e in range(E):
            out[o, e] += w * source[i, e]
    return out
