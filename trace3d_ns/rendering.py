"""One rasterization interface, two backends, chosen by the tensors' device.

- CUDA tensors: gsplat's fused kernels (`gsplat.rendering.rasterization`).
- Any other device: the project's tile-based torch rasterizer (`trace3d_ns.cuda.rasterization`).

Both return `(render_colors [C, H, W, X], render_alphas [C, H, W, 1], meta)` with the `meta` keys
that gsplat's strategies read. `contributions` lists, for one camera, every (Gaussian, pixel,
alpha * T) triple the compositor used: the primitive of Gaussian Instance Tracing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor


def rasterize(means: Tensor, *args: Any, **kwargs: Any) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """`gsplat.rendering.rasterization` signature; dispatches on `means.device`."""
    if means.is_cuda:
        from gsplat.rendering import rasterization
    else:
        from trace3d_ns.cuda.rasterization import rasterization
    return rasterization(means, *args, **kwargs)


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
    **kwargs: Any,
) -> Tuple[Tensor, Tensor, Dict[str, Any], Tensor]:
    """`rasterize` plus `extra_colors` composited like colour (no background): returns
    (render_colors, render_alphas, meta, extra [C, H, W, E]). The torch backend reuses the colour
    pass's pairs and weights; on CUDA see `_gsplat_with_extra`. On both, the extra channels'
    gradients reach the geometry, and `meta["means2d"]` (densification's statistics), only with
    `extra_grad_to_geometry`."""
    if not means.is_cuda:
        from trace3d_ns.cuda.rasterization import rasterization

        out = rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            extra_colors=extra_colors, extra_grad_to_geometry=extra_grad_to_geometry, **kwargs,
        )
        return out[0], out[1], out[2], out[2].pop("extra_render")
    from gsplat.cuda._wrapper import spherical_harmonics
    from gsplat.rendering import rasterization

    return _gsplat_with_extra(
        rasterization, spherical_harmonics, means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        extra_colors, extra_grad_to_geometry, **kwargs,
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
    **kwargs: Any,
) -> Tuple[Tensor, Tensor, Dict[str, Any], Tensor]:
    """The CUDA branch of `rasterize_with_extra`, for any `rasterization` with gsplat's signature
    (gsplat's; tests pass the torch backend's) and its `spherical_harmonics`.

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
        return render, alpha, meta, extra

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
    return render, alpha, meta, extra


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
) -> Contributions:
    """Every (Gaussian, pixel, alpha * T) pair of one view, exactly as the renderer composites them.

    On CUDA the pairs come from gsplat's `rasterize_to_indices_in_range` (same cut-offs as its
    renderer); elsewhere from the torch backend's tile enumeration. `indices_fn` overrides the
    pair source with a function of gsplat's `rasterize_to_indices_in_range` signature (tests use
    the torch twin `trace3d_ns.cuda.indices.rasterize_to_indices_in_range` to exercise this path).
    """
    from trace3d_ns.cuda.projection import project_gaussians
    from trace3d_ns.cuda.rasterization import pair_weights
    from trace3d_ns.cuda.tiles import intersect_tiles

    if means.is_cuda and indices_fn is None:
        from gsplat.cuda._wrapper import fully_fused_projection, isect_offset_encode, isect_tiles
        from gsplat.cuda._wrapper import rasterize_to_indices_in_range as indices_fn

        radii, means2d, depths, conics, comp = fully_fused_projection(
            means, None, quats, scales, viewmat[None], K[None], width, height, eps2d=eps2d,
            near_plane=near_plane, far_plane=far_plane, calc_compensations=rasterize_mode == "antialiased",
        )
        tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
        _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, tile_size, tw, th)
        offsets = isect_offset_encode(isect_ids, 1, tw, th)
    else:
        proj = project_gaussians(
            means, quats, scales, viewmat[None], K[None], width, height, eps2d=eps2d, near_plane=near_plane,
            far_plane=far_plane, calc_compensations=rasterize_mode == "antialiased",
        )
        radii, means2d, depths, conics, comp = proj
        if indices_fn is not None:
            tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
            isect = intersect_tiles(means2d, radii, depths, tile_size, tw, th)
            flatten_ids, offsets = isect.flatten_ids, isect.isect_offsets
    opac = opacities[None] if comp is None else opacities[None] * comp  # [1, N]

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
