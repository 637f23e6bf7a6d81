"""The compiled CPU backend: torch glue around the numba kernels of `cpu_kernels`.

- `composite`: differentiable compositing of projected Gaussians (a `torch.autograd.Function`
  whose forward and backward are the compiled tile kernels), the compositor of
  `trace3d_ns.cuda.rasterization.rasterization(backend="compiled")`.
- `contributing_pairs`: every (Gaussian, pixel, alpha * T) pair of one camera, grouped by pixel
  and front to back within a pixel (the layout of `tiles.contributing_pairs`).
- `patch_weights`: per-view GIT sums, weight per (Gaussian, patch), without listing the pairs.

`load()` compiles (or loads from numba's cache) the kernels once; when numba is missing or
cannot cache, `unavailable_reason()` says why and callers fall back to the torch backend.
"""

from __future__ import annotations

import os
import threading
from types import ModuleType
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from trace3d_ns.cuda.tiles import TileIntersections, sum_pairs_by_patch

_LOCK = threading.Lock()
"""Held around every parallel kernel call: numba's fallback threading layer (workqueue, where no
OpenMP or TBB is installed) aborts on parallel launches from two threads (the viewer renders
while training runs)."""
_KERNELS: Optional[ModuleType] = None
_UNAVAILABLE: Optional[str] = None


def load() -> ModuleType:
    """The kernel module; raises RuntimeError naming the cause when it cannot be used."""
    global _KERNELS, _UNAVAILABLE
    if _KERNELS is not None:
        return _KERNELS
    if _UNAVAILABLE is not None:
        raise RuntimeError(_UNAVAILABLE)
    with _LOCK:
        if _KERNELS is None and _UNAVAILABLE is None:
            try:
                import numba  # noqa: F401
            except ImportError as err:
                _UNAVAILABLE = f"numba is not installed ({err}); install it with `pip install numba`"
            else:
                try:
                    from trace3d_ns.cuda import cpu_kernels
                except Exception as err:  # numba raises RuntimeError when no cache folder is writable
                    _UNAVAILABLE = (
                        f"numba cannot compile or cache the kernels ({type(err).__name__}: {err}); "
                        "make NUMBA_CACHE_DIR point to a writable folder"
                    )
                else:
                    _KERNELS = cpu_kernels
    if _KERNELS is None:
        raise RuntimeError(_UNAVAILABLE)
    return _KERNELS


def unavailable_reason() -> Optional[str]:
    """None when the compiled backend can run, else why not."""
    try:
        load()
    except RuntimeError as err:
        return str(err)
    return None


def set_threads(threads: int) -> None:
    """Threads the kernels use (0 = all cores numba sees)."""
    import numba

    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS if threads <= 0 else min(threads, numba.config.NUMBA_NUM_THREADS))


def kernel_threads() -> int:
    """Threads the kernels use now (numba's; see `set_threads`)."""
    import numba

    return max(1, numba.get_num_threads())


def _np(t: Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)


def _arrays(kernels: ModuleType, means2d: Tensor, conics: Tensor, opacities: Tensor, colors: np.ndarray) -> tuple:
    """The compositing kernels' per-Gaussian inputs: means2d, conics, opacities, footprints, colours."""
    m, c, o = _np(means2d, np.float32), _np(conics, np.float32), _np(opacities, np.float32)
    with _LOCK:
        footprint = kernels.footprints(m, c, o)
    return m, c, o, footprint, colors


_NO_PIXELS = np.zeros(0, np.bool_)
"""`composite_tiles`' sparse_pixels outside render mode: unused."""


def _tile_starts(isect: TileIntersections) -> np.ndarray:
    """[C * tiles + 1] int64: first entry of every tile, then the entry count."""
    starts = isect.isect_offsets.reshape(-1).long()
    return np.append(_np(starts, np.int64), np.int64(isect.flatten_ids.numel()))


def _available_bytes() -> Optional[int]:
    """Memory available now, or None where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(num_bytes: int, num_gaussians: int, width: int, height: int, what: str) -> None:
    """MemoryError with the scene's size when `num_bytes` exceed the memory available now."""
    available = _available_bytes()
    if available is None:
        return
    if num_bytes > available:
        raise MemoryError(
            f"the compiled rasterizer needs {num_bytes / 2**30:.1f} GiB for {what} of {num_gaussians} Gaussians "
            f"at {width}x{height}, but only {available / 2**30:.1f} GiB are free: use fewer Gaussians, "
            "a smaller image (--pipeline.model.num-downscales) or the GPU"
        )


RECORD_BYTES_PER_VISIT = 10
"""A recorded visit: tile pixel (uint16), alpha and exp(-sigma) (float32 each)."""
RECORD_MAX_BYTES = 512 * 2**20
"""Most memory one forward pass records visits into (and at most a quarter of the memory available);
tiles beyond it are recomputed in the backward."""


class _VisitRecord:
    """Sizes the forward's record of composited visits, which lets the backward skip the footprint,
    sigma and exp of every visit (`cpu_kernels.backward_tiles`). Each worker thread writes its tiles
    into a part of its own; a tile that does not fit is not recorded and its backward recomputes
    the visits, so a record too small costs time, never correctness. The size follows the visits
    per pixel of the previous pass (with a margin)."""

    def __init__(self, visits_per_pixel: float = 32.0, margin: float = 1.25) -> None:
        self.visits_per_pixel = visits_per_pixel
        self.margin = margin

    def buffers(self, num_tiles: int, num_entries: int, num_pixels: int, workers: int) -> tuple:
        """(rec_tile, rec_start, rec_count, rec_pixel, rec_alpha, rec_vis, rec_used) for `composite_tiles`."""
        per_worker = int(self.margin * self.visits_per_pixel * num_pixels / workers) + 256
        limit = RECORD_MAX_BYTES
        available = _available_bytes()
        if available is not None:
            limit = min(limit, available // 4)  # the record is an optimisation: never what runs out of memory
        per_worker = min(per_worker, limit // (RECORD_BYTES_PER_VISIT * workers))
        total = per_worker * workers
        return (
            np.zeros(num_tiles, np.bool_), np.empty(num_entries, np.int64), np.zeros(num_entries, np.int32),
            np.empty(total, np.uint16), np.empty(total, np.float32), np.empty(total, np.float32),
            np.zeros(workers, np.int64),
        )

    def update(self, rec_used: np.ndarray, num_pixels: int) -> None:
        """Learn the size from a pass: the busiest worker's visits, as if every worker had as many."""
        if rec_used.size and num_pixels > 0:
            self.visits_per_pixel = float(rec_used.max()) * rec_used.size / num_pixels


VISIT_RECORD = _VisitRecord()
_NO_RECORD = (np.zeros(0, np.bool_), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint16),
              np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
"""`composite_tiles`' record arguments when nothing is recorded."""


class _PairRecord:
    """Sizes the buffers in which the render forward lists its composited visits at the sparse pixels
    (`composite(sparse_pairs=True)`). Each worker thread writes into a part of its own, as large as
    the visits of every sparse pixel could need at the learnt rate (a worker may get most of them);
    a worker that runs out counts on, and the pass is repeated once with room for that count."""

    def __init__(self, visits_per_pixel: float = 32.0, margin: float = 1.5) -> None:
        self.visits_per_pixel = visits_per_pixel
        self.margin = margin

    def capacity(self, num_sparse: int) -> int:
        return int(self.margin * self.visits_per_pixel * num_sparse) + 256

    def update(self, pair_used: np.ndarray, num_sparse: int) -> None:
        if num_sparse > 0:
            self.visits_per_pixel = max(1.0, float(pair_used.sum()) / num_sparse)


PAIR_RECORD = _PairRecord()
_NO_PAIRS = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
"""`composite_tiles`' pair arguments when no pairs are listed."""


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, backgrounds, absgrad, geometry, layout, sparse, pairs, num_gaussians):
        kernels = load()
        starts, flat, width, height, tile_size, tile_width, tiles_per_cam = layout
        C = backgrounds.shape[0]
        K = colors.shape[-1]
        num_pixels = C * width * height
        arrays = _arrays(kernels, means2d, conics, opacities, _np(colors, np.float32))
        bg = _np(backgrounds, np.float32)
        out = np.empty((num_pixels, K), dtype=np.float32)
        trans = np.empty(num_pixels, dtype=np.float64)
        last = np.empty(num_pixels, dtype=np.int32)
        i64, f32 = np.zeros(0, np.int64), np.zeros(0, np.float32)
        workers = kernel_threads()
        record = any(ctx.needs_input_grad[:4])  # only a backward reads the record
        rec = VISIT_RECORD.buffers(starts.shape[0] - 1, flat.shape[0], num_pixels, workers) if record else _NO_RECORD
        num_sparse = int(sparse[1].sum()) if pairs else 0
        capacity = PAIR_RECORD.capacity(num_sparse) if pairs else 0
        while True:
            listed = (
                np.empty(workers * capacity, np.int64), np.empty(workers * capacity, np.int64),
                np.empty(workers * capacity, np.float32), np.zeros(workers, np.int64),
            ) if pairs else _NO_PAIRS
            with _LOCK:
                kernels.composite_tiles(
                    kernels.MODE_RENDER, *arrays, bg, starts, flat, width, height, tile_size, tile_width, tiles_per_cam,
                    num_gaussians, np.zeros(0, np.int32), out, trans, last, i64, i64, i64, i64, f32, workers, *sparse,
                    *rec, *listed,
                )
            used = listed[3]
            if not pairs or used.max(initial=0) <= capacity:
                break
            capacity = int(used.max())  # a worker ran out: once more with room for what it counted
        if record:
            VISIT_RECORD.update(rec[-1], num_pixels)
        ctx.save_for_backward(means2d, conics, opacities, colors, backgrounds)
        ctx.state = (arrays, bg, trans, last, layout, geometry, absgrad, sparse, rec[:-1])
        render = torch.from_numpy(out).to(colors.dtype).reshape(C, height, width, K)
        alpha = torch.from_numpy(1.0 - trans).to(colors.dtype).reshape(C, height, width, 1)
        if not pairs:
            return render, alpha
        PAIR_RECORD.update(used, num_sparse)
        listed_t = tuple(  # [P] pixel, Gaussian, alpha * T: each worker's part, in turn
            torch.from_numpy(np.concatenate([a[w * capacity : w * capacity + used[w]] for w in range(workers)]))
            for a in listed[:3]
        )
        ctx.mark_non_differentiable(*listed_t)
        return (render, alpha, *listed_t)

    @staticmethod
    def backward(ctx, v_render, v_alpha, *_):
        kernels = load()
        means2d, conics, opacities, colors, backgrounds = ctx.saved_tensors
        arrays, bg, trans, last, layout, geometry, absgrad, sparse, rec = ctx.state
        starts, flat, width, height, tile_size, tile_width, tiles_per_cam = layout
        M, K = flat.shape[0], colors.shape[-1]
        E = kernels.ENTRY_GRADS
        v_entries = np.empty((M, E + K), np.float32)  # [M, 8 + K]
        with _LOCK:
            kernels.backward_tiles(
                *arrays, bg, starts, flat, width, height, tile_size, tile_width, tiles_per_cam, geometry,
                trans, last, _np(v_render.reshape(-1, K), np.float32), _np(v_alpha.reshape(-1), np.float32),
                v_entries, kernel_threads(), *sparse, *rec,
            )
            # [CN, 8 + K] summed per Gaussian
            grads = torch.from_numpy(kernels.reduce_entries(flat, v_entries, means2d.shape[0], kernel_threads()))
        if absgrad is not None:
            absgrad.view(-1, 2).add_(grads[:, 6:8].to(absgrad.device))
        ctx.state = None
        return (
            grads[:, 0:2].to(means2d.dtype),
            grads[:, 2:5].to(conics.dtype),
            grads[:, 5].to(opacities.dtype),
            grads[:, E:].to(colors.dtype),
            None, None, None, None, None, None, None,
        )


def composite(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    colors: Tensor,  # [C, N, K]
    backgrounds: Optional[Tensor],  # [C, K] or None (black)
    isect: TileIntersections,
    width: int,
    height: int,
    tile_size: int,
    absgrad: Optional[Tensor] = None,  # [C, N, 2] filled with sum |dL/dmeans2d| in backward
    geometry_channels: Optional[int] = None,  # channels whose gradients reach the geometry (default all)
    sparse_from: Optional[int] = None,  # channels from here on are composited only at `sparse_pixels`
    sparse_pixels: Optional[Tensor] = None,  # [C, H, W] bool
    sparse_pairs: bool = False,
) -> tuple:
    """Differentiable front-to-back compositing: (render [C, H, W, K], alphas [C, H, W, 1]).

    Channels from `geometry_channels` on still get colour gradients, but their loss does not move
    means2d, conics or opacities (features lifted without moving the geometry). With
    `sparse_pixels`, channels from `sparse_from` on are composited only there and are 0 elsewhere
    (a loss that reads a few pixels of them skips the work on the rest). With `sparse_pixels` and
    `sparse_pairs` (and no `sparse_from`), the forward also lists every visit it composites at those
    pixels, returned as a third to fifth output: pixel ids (c * H * W + y * W + x) [P] int64, Gaussians
    (n) [P] int64 and their alpha * T [P] float32, in the order the tiles composite them (front to
    back within each pixel; no gradient): channels composited with fixed weights need nothing else.
    When a gradient is needed, the forward records its visits for the backward (`VISIT_RECORD`)."""
    C, N, K = colors.shape
    tile_width = -(-width // tile_size)
    tiles_per_cam = tile_width * -(-height // tile_size)
    M = isect.flatten_ids.numel()
    _check_memory(M * (K + 8) * 4 + C * width * height * (K * 12 + 16), N, width, height, "the per-tile gradients")
    layout = (_tile_starts(isect), _np(isect.flatten_ids, np.int32), width, height, tile_size, tile_width, tiles_per_cam)
    if backgrounds is None:
        backgrounds = colors.new_zeros(C, K)
    geometry = K if geometry_channels is None else geometry_channels
    if sparse_pixels is None:
        sparse = (K, np.zeros(0, np.bool_))
    else:
        sparse_from = K if sparse_pairs and sparse_from is None else sparse_from
        if sparse_pixels.shape != (C, height, width) or sparse_from is None:
            raise ValueError(f"sparse_pixels must be [C, H, W] = [{C}, {height}, {width}] with sparse_from, got {tuple(sparse_pixels.shape)}")
        sparse = (int(sparse_from), _np(sparse_pixels.reshape(-1), np.bool_))
    if sparse_pairs and (sparse_pixels is None or sparse[0] != K):
        raise ValueError("sparse_pairs lists the visits at sparse_pixels: give sparse_pixels and no sparse_from channels")
    return _Composite.apply(
        means2d.reshape(C * N, 2), conics.reshape(C * N, 3), opacities.reshape(C * N), colors.reshape(C * N, K),
        backgrounds, absgrad, geometry, layout, sparse, sparse_pairs, N,
    )


class _WeightedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, source, index_out, index_in, weight, num_out):
        kernels = load()
        idx_out, idx_in, w = _np(index_out, np.int64), _np(index_in, np.int64), _np(weight, np.float32)
        ctx.save = (idx_out, idx_in, w, source.shape[0])
        return torch.from_numpy(kernels.weighted_rows(idx_out, idx_in, w, _np(source, np.float32), num_out)).to(source.dtype)

    @staticmethod
    def backward(ctx, grad):
        kernels = load()
        idx_out, idx_in, w, rows = ctx.save
        ctx.save = None
        v_source = kernels.weighted_rows(idx_in, idx_out, w, _np(grad, np.float32), rows)
        return torch.from_numpy(v_source).to(grad.dtype), None, None, None, None


def weighted_rows(source: Tensor, index_out: Tensor, index_in: Tensor, weight: Tensor, num_out: int) -> Tensor:
    """Differentiable (in `source` [R, E]) sum out[index_out[k]] += weight[k] * source[index_in[k]] ->
    [num_out, E], in one compiled pass each way: what `index_add` of `index_select` computes, without
    their [P, E] intermediates (P ~ 10^5 visits at a loss's sampled pixels)."""
    return _WeightedRows.apply(source, index_out, index_in, weight, num_out)


def _count_then_fill(
    count_mode: int,
    fill_mode: int,
    means2d: Tensor,  # [N, 2] one camera
    conics: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    radii: Tensor,  # [N]
    depths: Tensor,  # [N]
    width: int,
    height: int,
    tile_size: int,
    patch_map: Optional[Tensor] = None,  # [H, W] (patch modes)
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One camera through the compositing kernel twice: `count_mode` sizes the output (per pixel
    for pairs, per tile entry for patches), `fill_mode` writes it. Returns (gaussian [P] int64,
    pixel or patch id [P] int64, weight [P] float32)."""
    kernels = load()
    N = means2d.shape[0]
    tile_width = -(-width // tile_size)
    tiles = tile_width * -(-height // tile_size)
    isect = intersect_tiles(means2d[None], radii[None], depths[None], tile_size, tile_width, tiles // tile_width)
    starts, flat = _tile_starts(isect), _np(isect.flatten_ids, np.int32)
    arrays = _arrays(kernels, means2d, conics, opacities, np.zeros((N, 0), np.float32))
    labels = np.zeros(0, np.int32) if patch_map is None else _np(patch_map.reshape(-1), np.int32)
    common = (np.zeros((1, 0), np.float32), starts, flat, width, height, tile_size, tile_width, tiles, N, labels)
    unused = (np.zeros((0, 0), np.float32), np.zeros(0, np.float64), np.zeros(0, np.int32))  # render outputs
    counts = np.zeros(width * height if patch_map is None else flat.shape[0], np.int64)
    i64, f32 = np.zeros(0, np.int64), np.zeros(0, np.float32)
    with _LOCK:
        kernels.composite_tiles(
            count_mode, *arrays, *common, *unused, counts, i64, i64, i64, f32, kernel_threads(), 0, _NO_PIXELS,
            *_NO_RECORD, *_NO_PAIRS,
        )
    total = int(counts.sum())
    _check_memory(total * 20, N, width, height, "the contribution list")
    offsets = np.cumsum(counts) - counts
    gids, index, weights = np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.float32)
    with _LOCK:
        kernels.composite_tiles(
            fill_mode, *arrays, *common, *unused, counts, offsets, gids, index, weights, kernel_threads(), 0,
            _NO_PIXELS, *_NO_RECORD, *_NO_PAIRS,
        )
    return gids, index, weights


@torch.no_grad()
def contributing_pairs(
    means2d: Tensor,  # [N, 2] one camera
    conics: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    radii: Tensor,  # [N] 0 = culled
    depths: Tensor,  # [N]
    width: int,
    height: int,
    tile_size: int = 16,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(gaussian_ids [P] int64, pixel_ids [P] int64, weights alpha * T [P] float32) of every pair
    the compositor uses, grouped by pixel (ascending), front to back within a pixel."""
    kernels = load()
    out = _count_then_fill(
        kernels.MODE_COUNT_PAIRS, kernels.MODE_FILL_PAIRS, means2d, conics, opacities, radii, depths, width, height,
        tile_size,
    )
    return tuple(torch.from_numpy(a).to(means2d.device) for a in out)


@torch.no_grad()
def patch_weights(
    means2d: Tensor,  # [N, 2] one camera
    conics: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    radii: Tensor,  # [N]
    depths: Tensor,  # [N]
    patch_map: Tensor,  # [H, W] int patch id of every pixel
    tile_size: int = 16,
) -> Tuple[Tensor, Tensor, Tensor]:
    """GIT sums of one view without listing its pairs: (gaussian [U] int64, patch [U] int64,
    weight [U] float32), the total alpha * T each Gaussian puts into each patch, one row per
    (Gaussian, patch), sorted by Gaussian then patch."""
    kernels = load()
    height, width = patch_map.shape
    gids, patches, weights = _count_then_fill(
        kernels.MODE_COUNT_PATCHES, kernels.MODE_FILL_PATCHES, means2d, conics, opacities, radii, depths, width,
        height, tile_size, patch_map,
    )
    # one row per (tile entry, patch): sum over the tiles of each Gaussian
    gaussian, patch, weight = sum_pairs_by_patch(torch.from_numpy(gids), torch.from_numpy(patches), torch.from_numpy(weights))
    return gaussian.to(means2d.device), patch.to(means2d.device), weight.to(means2d.device)


def _geometry() -> ModuleType:
    load()  # same availability rules as the compositing kernels
    from trace3d_ns.cuda import cpu_geometry

    return cpu_geometry


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, viewmats, Ks, settings):
        kernels = _geometry()
        width, height, eps2d, near_plane, far_plane, radius_clip = settings
        C, N = viewmats.shape[0], means.shape[0]
        arrays = tuple(_np(t, np.float32) for t in (means, quats, scales, viewmats, Ks))
        radii = np.empty((C, N), np.int32)
        means2d = np.empty((C, N, 2), np.float32)
        depths = np.empty((C, N), np.float32)
        conics = np.empty((C, N, 3), np.float32)
        comp = np.empty((C, N), np.float32)
        with _LOCK:
            kernels.project_forward(
                *arrays, width, height, eps2d, near_plane, far_plane, radius_clip, radii, means2d, depths, conics, comp
            )
        ctx.arrays, ctx.settings, ctx.radii = arrays, settings, radii
        ctx.mark_non_differentiable(radii := torch.from_numpy(radii))
        return radii, torch.from_numpy(means2d), torch.from_numpy(depths), torch.from_numpy(conics), torch.from_numpy(comp)

    @staticmethod
    def backward(ctx, _, v_means2d, v_depths, v_conics, v_comp):
        kernels = _geometry()
        width, height, eps2d = ctx.settings[:3]
        means = ctx.arrays[0]
        v_means = np.empty_like(means)
        v_quats = np.empty_like(ctx.arrays[1])
        v_scales = np.empty_like(ctx.arrays[2])
        with _LOCK:
            kernels.project_backward(
                *ctx.arrays, width, height, eps2d, ctx.radii, _np(v_means2d, np.float32), _np(v_depths, np.float32),
                _np(v_conics, np.float32), _np(v_comp, np.float32), v_means, v_quats, v_scales,
            )
        ctx.arrays = ctx.radii = None
        return torch.from_numpy(v_means), torch.from_numpy(v_quats), torch.from_numpy(v_scales), None, None, None


def project(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    viewmats: Tensor,  # [C, 4, 4] (no gradient)
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    calc_compensations: bool = False,
):
    """`projection.project_gaussians` in the compiled kernels (gradients to means, quats and
    scales; none to the cameras): a `projection.Projection`."""
    from trace3d_ns.cuda.projection import Projection

    settings = (width, height, float(eps2d), float(near_plane), float(far_plane), float(radius_clip))
    radii, means2d, depths, conics, comp = _Project.apply(means, quats, scales, viewmats, Ks, settings)
    return Projection(radii, means2d, depths, conics, comp if calc_compensations else None)


class _SphericalHarmonics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, degree, means, campos, coeffs):
        kernels = _geometry()
        arrays = (_np(means, np.float32), _np(campos, np.float32), _np(coeffs, np.float32))
        colors = np.empty((campos.shape[0], means.shape[0], 3), np.float32)
        with _LOCK:
            kernels.sh_forward(degree, *arrays, colors)
        ctx.degree, ctx.arrays = degree, arrays
        return torch.from_numpy(colors)

    @staticmethod
    def backward(ctx, v_colors):
        kernels = _geometry()
        means, _, coeffs = ctx.arrays
        v_coeffs = np.zeros_like(coeffs)
        v_means = np.zeros_like(means)
        with _LOCK:
            kernels.sh_backward(ctx.degree, *ctx.arrays, _np(v_colors, np.float32), v_coeffs, v_means)
        ctx.arrays = None
        return None, torch.from_numpy(v_means), None, torch.from_numpy(v_coeffs)


def sh_colors(degree: int, means: Tensor, campos: Tensor, coeffs: Tensor) -> Tensor:
    """clamp_min(SH(degree, means - campos) + 0.5, 0) in the compiled kernels, as the torch
    rasterizer colours Gaussians. means [N, 3], campos [C, 3], coeffs [N, K, 3] -> [C, N, 3]."""
    return _SphericalHarmonics.apply(degree, means, campos, coeffs)


@torch.no_grad()
def intersect_tiles(
    means2d: Tensor,  # [C, N, 2]
    radii: Tensor,  # [C, N]
    depths: Tensor,  # [C, N]
    tile_size: int,
    tile_width: int,
    tile_height: int,
) -> TileIntersections:
    """`tiles.intersect_tiles` in the compiled kernels (the same ids, order and offsets)."""
    kernels = _geometry()
    C = radii.shape[0]
    counts, isect_ids, flatten_ids, starts = kernels.bin_tiles(
        _np(means2d, np.float32), _np(radii, np.int32), _np(depths, np.float32), tile_size, tile_width, tile_height
    )
    offsets = torch.from_numpy(starts[:-1].astype(np.int32)).reshape(C, tile_height, tile_width)
    return TileIntersections(torch.from_numpy(counts), torch.from_numpy(isect_ids), torch.from_numpy(flatten_ids), offsets)
