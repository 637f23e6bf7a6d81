"""One rasterization interface, three backends.

- `gsplat`: gsplat's fused CUDA kernels (`gsplat.rendering.rasterization`), CUDA tensors only.
- `compiled`: the project's numba tile kernels (`trace3d_ns.cuda.compiled`), CPU tensors only.
- `torch`: the project's tile-based torch rasterizer, any device; the reference the others are
  tested against.

`backend="auto"` (the default everywhere) takes gsplat for CUDA tensors and the compiled kernels
for CPU tensors, falling back to torch (with one warning saying why) when numba cannot run.
All return `(render_colors [C, H, W, X], render_alphas [C, H, W, 1], meta)` with the `meta` keys
that gsplat's strategies read. `contributions` lists, for one camera, every (Gaussian, pixel,
alpha * T) triple the compositor used: the primitive of Gaussian Instance Tracing;
`patch_weights` gives its per-view sums per (Gaussian, patch) directly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor


BACKENDS = ("auto", "gsplat", "compiled", "torch")
_WARNED: set = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for tensors on `device`: "gsplat", "compiled" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"rasterizer backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "gsplat" and device.type != "cuda":
        raise ValueError(f"the gsplat backend needs CUDA tensors, got {device}; use 'auto', 'compiled' or 'torch'")
    if backend == "compiled" and device.type != "cpu":
        raise ValueError(f"the compiled backend runs on the CPU, got {device}; use 'auto', 'gsplat' or 'torch'")
    if backend == "auto":
        backend = "gsplat" if device.type == "cuda" else "compiled" if device.type == "cpu" else "torch"
    if backend == "compiled":
        from trace3d_ns.cuda.compiled import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            if reason not in _WARNED:
                _WARNED.add(reason)
                warnings.warn(f"trace3d: the compiled CPU rasterizer cannot run ({reason}); using the torch backend")
            return "torch"
    return backend


def rasterize(
    means: Tensor, *args: Any, backend: str = "auto", **kwargs: Any
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """`gsplat.rendering.rasterization` signature, on the chosen backend (see the module docstring)."""
    backend = resolve_backend(backend, means.device)
    if backend == "gsplat":
        from gsplat.rendering import rasterization

        return rasterization(means, *args, **kwargs)
    from trace3d_ns.cuda.rasterization import rasterization

    return rasterization(means, *args, backend=backend, **kwargs)


def rasterize_with_extra(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    extra_colors: Tensor,  # [N, E] e.g. instance features
    extra_grad_to_geometry: bool = False,
    backend: str = "auto",
    extra_pixels: Optional[Tensor] = None,  # [C, H, W] bool
    **kwargs: Any,
) -> Tuple[Tensor, Tensor, Dict[str, Any], Tensor]:
    """`rasterize` plus `extra_colors` composited like colour (no background): returns
    (render_colors, render_alphas, meta, extra [C, H, W, E]). The CPU backends composite them in
    the colour pass, with the colour's pairs and weights; with gsplat see `_gsplat_with_extra`. On
    all, the extra channels' gradients reach the geometry, and `meta["means2d"]` (densification's
    statistics), only with `extra_grad_to_geometry`.

    `extra_pixels`: the pixels where the extra channels are needed (e.g. a loss's samples); they
    are 0 elsewhere on every backend, and the compiled one skips their compositing there."""
    backend = resolve_backend(backend, means.device)
    if backend != "gsplat":
        from trace3d_ns.cuda.rasterization import rasterization

        out = rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            extra_colors=extra_colors, extra_grad_to_geometry=extra_grad_to_geometry, backend=backend,
            extra_pixels=extra_pixels, **kwargs,
        )
        return out[0], out[1], out[2], out[2].pop("extra_render")
    from gsplat.cuda._wrapper import spherical_harmonics
    from gsplat.rendering import rasterization

    return _gsplat_with_extra(
        rasterization, spherical_harmonics, means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        extra_colors, extra_grad_to_geometry, extra_pixels=extra_pixels, **kwargs,
    )


GSPLAT_CHANNEL_CHUNK = 32
"""gsplat's default `channel_chunk` (channels rendered per kernel call)."""


def _gsplat_with_extra(
    rasterization: Callable[..., Tuple[Tensor, Tensor, Dict[str, Any]]],
    spherical_harmonics: Callable[..., Tensor],
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [(C,) N, D] or [(C,) N, K, 3] with sh_degree
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    extra_colors: Tensor,  # [N, E]
    extra_grad_to_geometry: bool,
    extra_pixels: Optional[Tensor] = None,  # [C, H, W] bool
    **kwargs: Any,
) -> Tuple[Tensor, Tensor, Dict[str, Any], Tensor]:
    """The CUDA branch of `rasterize_with_extra`, for any `rasterization` with gsplat's signature
    (gsplat's; tests pass the torch backend's) and its `spherical_harmonics`. gsplat composites the
    extra channels everywhere; outside `extra_pixels` they are then set to 0, as on the CPU backends.

    - `extra_grad_to_geometry`: one pass whose colours are [colour | extra] (SH evaluated here as
      gsplat does), so the extra channels' gradients flow into the same `meta["means2d"]` that
      densification reads, as on the torch backend (a second pass has its own means2d, which no
      strategy sees). All channels go in one kernel call: gsplat keeps only the last chunk's absgrad.
    - otherwise: a second pass on detached geometry (nothing of the extras reaches the geometry).
    """
    render_mode = kwargs.get("render_mode", "RGB")
    if not extra_grad_to_geometry or render_mode not in ("RGB", "RGB+D", "RGB+ED"):
        render, alpha, meta = rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kwargs
        )
        geometry = [means, quats, scales, opacities]
        if not extra_grad_to_geometry:
            geometry = [t.detach() for t in geometry]
        extra_kwargs = {k: v for k, v in kwargs.items() if k in ("near_plane", "far_plane", "rasterize_mode", "eps2d")}
        extra, _, _ = rasterization(*geometry, extra_colors, viewmats, Ks, width, height, packed=False, **extra_kwargs)
        return render, alpha, meta, _mask_extra(extra, extra_pixels)

    C = viewmats.shape[0]
    sh_degree = kwargs.pop("sh_degree", None)
    if sh_degree is None:
        base = colors.expand(C, -1, -1) if colors.dim() == 2 else colors  # [C, N, D]
    else:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
        shs = colors.expand(C, -1, -1, -1) if colors.dim() == 3 else colors  # [C, N, K, 3]
        base = torch.clamp_min(spherical_harmonics(sh_degree, means[None] - campos[:, None], shs) + 0.5, 0.0)
    D, E = base.shape[-1], extra_colors.shape[-1]
    both = torch.cat([base, extra_colors.expand(C, -1, -1)], dim=-1)  # [C, N, D + E]
    backgrounds = kwargs.pop("backgrounds", None)
    if backgrounds is not None:  # [C, D]: the extra channels get none
        backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, E)], dim=-1)
    channels = D + E + (1 if render_mode != "RGB" else 0)
    if channels > kwargs.get("channel_chunk", GSPLAT_CHANNEL_CHUNK):
        kwargs["channel_chunk"] = channels
    render, alpha, meta = rasterization(
        means, quats, scales, opacities, both, viewmats, Ks, width, height, sh_degree=None, backgrounds=backgrounds,
        **kwargs,
    )
    extra = render[..., D : D + E]  # [C, H, W, E]
    render = torch.cat([render[..., :D], render[..., D + E :]], dim=-1)  # [C, H, W, D (+ 1)]
    return render, alpha, meta, _mask_extra(extra, extra_pixels)


def _mask_extra(extra: Tensor, extra_pixels: Optional[Tensor]) -> Tensor:
    from trace3d_ns.cuda.rasterization import mask_extra

    return mask_extra(extra, extra_pixels)


@dataclass
class Contributions:
    """Sparse blending weights of one view: pair k says Gaussian `gaussian_ids[k]` put weight
    `weights[k]` = alpha * T into pixel `pixel_ids[k]` (row-major). Grouped by pixel, front to back."""

    gaussian_ids: Tensor  # [P] int64
    pixel_ids: Tensor  # [P] int64
    weights: Tensor  # [P] float32
    width: int
    height: int

    def __len__(self) -> int:
        return self.gaussian_ids.numel()


IndicesFn = Callable[..., Tuple[Tensor, Tensor, Tensor]]


def _project_one_view(
    backend: str, means: Tensor, quats: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
    eps2d: float, near_plane: float, far_plane: float, rasterize_mode: str,
):
    """(radii, means2d, depths, conics, compensations or None) of one camera ([1, N, ...]): the
    compiled projection on the compiled backend (no [N, 3, 3] torch temporaries: at 1M Gaussians
    those were most of a traced view's working memory), the torch one otherwise."""
    if backend == "compiled":
        from trace3d_ns.cuda.compiled import project
    else:
        from trace3d_ns.cuda.projection import project_gaussians as project
    return project(
        means, quats, scales, viewmat[None], K[None], width, height, eps2d=eps2d, near_plane=near_plane,
        far_plane=far_plane, calc_compensations=rasterize_mode == "antialiased",
    )


def _check_one_view(name: str, viewmat: Tensor, K: Tensor) -> None:
    if viewmat.shape != (4, 4) or K.shape != (3, 3):
        raise ValueError(
            f"{name}() takes one view: viewmat [4, 4] and K [3, 3], got {list(viewmat.shape)} and {list(K.shape)}"
        )


def _project_view(
    backend: str, means: Tensor, quats: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
    eps2d: float, near_plane: float, far_plane: float, rasterize_mode: str,
):
    """(radii, means2d, depths, conics, compensations or None) of one camera ([1, N, ...]) on a
    resolved backend: gsplat's fused projection, else :func:`_project_one_view`."""
    if backend == "gsplat":
        from gsplat.cuda._wrapper import fully_fused_projection

        return fully_fused_projection(
            means, None, quats, scales, viewmat[None], K[None], width, height, eps2d=eps2d,
            near_plane=near_plane, far_plane=far_plane, calc_compensations=rasterize_mode == "antialiased",
        )
    return _project_one_view(
        backend, means, quats, scales, viewmat, K, width, height, eps2d, near_plane, far_plane, rasterize_mode
    )


@torch.no_grad()
def contributions(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3] (activated)
    opacities: Tensor,  # [N] (activated)
    viewmat: Tensor,  # [4, 4] world-to-camera
    K: Tensor,  # [3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    rasterize_mode: str = "classic",
    tile_size: int = 16,
    indices_fn: Optional[IndicesFn] = None,
    backend: str = "auto",
) -> Contributions:
    """Every (Gaussian, pixel, alpha * T) pair of one view, exactly as the renderer composites them.

    On CUDA the pairs come from gsplat's `rasterize_to_indices_in_range` (same cut-offs as its
    renderer); elsewhere from the torch backend's tile enumeration. `indices_fn` overrides the
    pair source with a function of gsplat's `rasterize_to_indices_in_range` signature (tests use
    the torch twin `trace3d_ns.cuda.indices.rasterize_to_indices_in_range` to exercise this path).
    On the CPU the compiled kernels list the pairs in the same order.
    """
    from trace3d_ns.cuda.rasterization import pair_weights
    from trace3d_ns.cuda.tiles import intersect_tiles

    _check_one_view("contributions", viewmat, K)
    backend = resolve_backend(backend, means.device)
    if backend == "gsplat" and indices_fn is None:
        from gsplat.cuda._wrapper import isect_offset_encode, isect_tiles
        from gsplat.cuda._wrapper import rasterize_to_indices_in_range as indices_fn

        radii, means2d, depths, conics, comp = _project_view(
            "gsplat", means, quats, scales, viewmat, K, width, height, eps2d, near_plane, far_plane, rasterize_mode
        )
        tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
        _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, tile_size, tw, th)
        offsets = isect_offset_encode(isect_ids, 1, tw, th)
    else:
        radii, means2d, depths, conics, comp = _project_view(
            backend if indices_fn is None else "torch", means, quats, scales, viewmat, K, width, height, eps2d,
            near_plane, far_plane, rasterize_mode,
        )
        if indices_fn is not None:
            tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
            isect = intersect_tiles(means2d, radii, depths, tile_size, tw, th)
            flatten_ids, offsets = isect.flatten_ids, isect.isect_offsets
    opac = opacities[None] if comp is None else opacities[None] * comp  # [1, N]

    if backend == "compiled" and indices_fn is None:
        from trace3d_ns.cuda import compiled

        gids, pids, weights = compiled.contributing_pairs(
            means2d[0], conics[0], opac[0], radii[0], depths[0], width, height, tile_size
        )
        return Contributions(gids, pids, weights, width, height)
    if indices_fn is not None:
        transmittances = torch.ones(1, height, width, device=means.device)
        gids, pids, _ = indices_fn(
            0, 2**31 - 1, transmittances, means2d, conics, opac, width, height, tile_size, offsets, flatten_ids
        )
        gids, pids = gids.long(), pids.long()
    else:
        from trace3d_ns.cuda.tiles import contributing_pairs

        gids, pids, weights = contributing_pairs(
            means2d[0], conics[0], opac[0], radii[0], depths[0], width, height, tile_size, return_weights=True
        )  # weights from the cut-off pass itself: no second alpha / transmittance pass
        return Contributions(gids, pids, weights.float(), width, height)
    weights = pair_weights(gids, pids, means2d[0][gids], conics[0], opac[0], width)
    return Contributions(gids, pids, weights.float(), width, height)


@torch.no_grad()
def footprint_masses(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3] (activated)
    opacities: Tensor,  # [N] (activated)
    viewmat: Tensor,  # [4, 4] world-to-camera
    K: Tensor,  # [3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    rasterize_mode: str = "classic",
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """What each Gaussian would draw in one view with nothing in front of it: (mass [N] float32,
    in_frame [N] bool).

    The mass is alpha summed over the image plane, ``o 2 pi sqrt(det Sigma2d) (1 - 1 / (255 o))``
    for the opacity ``o`` as rendered (times the antialiased mode's compensation) and the projected
    covariance (``eps2d`` included), counting only where alpha >= 1/255 as the renderer does (its
    0.999 clip is ignored). ``in_frame``: projected and its footprint box (``means2d`` +- radius)
    inside the image, where that integral is the pixel sum (a Gaussian of std >= 0.5 px sampled on
    the pixel grid sums to its integral within 1e-3). Comparing it with the weight the Gaussian
    actually draws (alpha * T, e.g. its traced weight) tells how much of it other surfaces hide.
    0 mass where culled or never drawn (o < 1/255)."""
    _check_one_view("footprint_masses", viewmat, K)
    radii, means2d, _, conics, comp = _project_view(
        resolve_backend(backend, means.device), means, quats, scales, viewmat, K, width, height, eps2d,
        near_plane, far_plane, rasterize_mode,
    )
    radii, means2d, conics = radii[0], means2d[0], conics[0].double()  # [N], [N, 2], [N, 3]
    opac = (opacities if comp is None else opacities * comp[0]).double()  # [N]
    det = conics[:, 0] * conics[:, 2] - conics[:, 1] ** 2  # [N] det of the inverse covariance
    drawn = (radii > 0) & (det > 0) & (opac * 255.0 > 1.0)  # [N]
    safe_det = torch.where(drawn, det, torch.ones_like(det))
    safe_opac = torch.where(drawn, opac, torch.ones_like(opac))
    mass = 2.0 * math.pi * safe_opac * (1.0 - 1.0 / (255.0 * safe_opac)) / torch.sqrt(safe_det)  # [N]
    mass = torch.where(drawn, mass, torch.zeros_like(mass)).float()
    r = radii.to(means2d.dtype)  # [N]
    in_frame = drawn & (means2d[:, 0] - r >= 0) & (means2d[:, 0] + r <= width)
    in_frame &= (means2d[:, 1] - r >= 0) & (means2d[:, 1] + r <= height)
    return mass, in_frame


@torch.no_grad()
def patch_weights(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3] (activated)
    opacities: Tensor,  # [N] (activated)
    viewmat: Tensor,  # [4, 4]
    K: Tensor,  # [3, 3]
    patch_map: Tensor,  # [H, W] int patch id of every pixel
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    rasterize_mode: str = "classic",
    tile_size: int = 16,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gaussian Instance Tracing's sums for one view: (gaussian [U] int64, patch [U] int64, weight
    [U] float32), the total alpha * T each Gaussian puts into each patch, one row per (Gaussian,
    patch) with weight > 0, sorted by Gaussian then patch.

    The compiled backend sums inside the kernel, without listing the view's pairs; the others sum
    the pairs of `contributions` (the reference)."""
    height, width = patch_map.shape
    backend = resolve_backend(backend, means.device)
    if backend != "compiled":
        c = contributions(
            means, quats, scales, opacities, viewmat, K, width, height, near_plane, far_plane, eps2d, rasterize_mode,
            tile_size, backend=backend,
        )
        labels = patch_map.reshape(-1).to(c.pixel_ids.device).long()[c.pixel_ids]  # [P]
        from trace3d_ns.cuda.tiles import sum_pairs_by_patch

        return sum_pairs_by_patch(c.gaussian_ids, labels, c.weights)
    from trace3d_ns.cuda import compiled

    radii, means2d, depths, conics, comp = _project_one_view(
        backend, means, quats, scales, viewmat, K, width, height, eps2d, near_plane, far_plane, rasterize_mode
    )
    opac = opacities if comp is None else opacities * comp[0]  # [N]
    return compiled.patch_weights(means2d[0], conics[0], opac, radii[0], depths[0], patch_map, tile_size)

