"""gsplat 1.4.0 `rasterization(packed=False)` off CUDA, with two compositors.

Projection, colour evaluation (SH) and tile binning are differentiable torch, shared. Compositing:

- `backend="torch"` (the reference, any device): the (Gaussian, pixel) pairs that contribute are
  found without gradients per 16x16 tile (`tiles.contributing_pairs`), then alpha, transmittance
  and the composite are recomputed on those pairs only, with autograd. Memory and time grow with
  contributions, not Gaussians x pixels.
- `backend="compiled"` (CPU): the numba tile kernels of `compiled` (forward front to back, backward
  back to front as gsplat's), parallel over tiles.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from trace3d_ns.cuda.projection import project_gaussians
from trace3d_ns.cuda.sh import spherical_harmonics
from trace3d_ns.cuda.tiles import (
    contributing_pairs,
    exclusive_transmittance,
    intersect_tiles,
    splat_alpha,
)

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")


def pair_weights(
    gaussian_ids: Tensor,  # [P] grouped by pixel, front to back
    pixel_ids: Tensor,  # [P] row-major pixel index
    pair_means2d: Tensor,  # [P, 2] means2d[gaussian_ids]
    conics: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    width: int,
) -> Tensor:
    """Blending weight alpha * T of each listed pair. [P]"""
    px = (pixel_ids % width).to(pair_means2d.dtype) + 0.5
    py = torch.div(pixel_ids, width, rounding_mode="floor").to(pair_means2d.dtype) + 0.5
    _, alpha = splat_alpha(pair_means2d, conics[gaussian_ids], opacities[gaussian_ids], px, py)  # [P]
    return alpha * exclusive_transmittance(alpha, pixel_ids)


def composite_pairs(
    gaussian_ids: Tensor,  # [P] grouped by pixel, front to back
    pixel_ids: Tensor,  # [P]
    means2d: Tensor,  # [N, 2]
    conics: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D]
    width: int,
    height: int,
    absgrad: Optional[Tensor] = None,  # [N, 2] filled with sum |dL/dmeans2d| per pair in backward
    extra_colors: Optional[Tensor] = None,  # [N, E] composited with the same weights
    extra_grad_to_geometry: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Differentiable front-to-back compositing of the listed pairs.

    Returns (colours [H*W, D] without background, alphas [H*W], weights alpha*T [P], extra colours
    [H*W, E] or None). The extra colours reach the geometry's gradients only if asked.
    """
    pair_means = means2d[gaussian_ids]  # [P, 2]
    if absgrad is not None and pair_means.requires_grad:

        def accumulate_absgrad(grad: Tensor) -> None:
            absgrad.index_add_(0, gaussian_ids, grad.abs())

        pair_means.register_hook(accumulate_absgrad)
    weights = pair_weights(gaussian_ids, pixel_ids, pair_means, conics, opacities, width)  # [P]
    num_pixels = width * height
    image = colors.new_zeros(num_pixels, colors.shape[-1]).index_add(
        0, pixel_ids, weights[:, None] * colors[gaussian_ids]
    )  # [H*W, D]
    alphas = weights.new_zeros(num_pixels).index_add(0, pixel_ids, weights)  # [H*W]
    extra = None
    if extra_colors is not None:
        w = weights if extra_grad_to_geometry else weights.detach()
        extra = extra_colors.new_zeros(num_pixels, extra_colors.shape[-1]).index_add(
            0, pixel_ids, w[:, None] * extra_colors[gaussian_ids]
        )  # [H*W, E]
    return image, alphas, weights, extra


def rasterization(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [(C,) N, D] or [(C,) N, K, 3] with sh_degree
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,  # [C, D]
    render_mode: str = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: str = "classic",
    camera_model: str = "pinhole",
    extra_colors: Optional[Tensor] = None,  # [N, E]
    extra_grad_to_geometry: bool = False,
    backend: str = "torch",
    extra_pixels: Optional[Tensor] = None,  # [C, H, W] bool
    **unsupported: Any,
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """Same arguments, outputs and `meta` as `gsplat.rendering.rasterization(packed=False)`.

    Returns (render_colors [C, H, W, X], render_alphas [C, H, W, 1], meta). Beyond gsplat:
    `extra_colors` are composited with the same pairs and weights (no second pass) and returned as
    `meta["extra_render"]` [C, H, W, E], without background; their gradients reach the geometry
    only with `extra_grad_to_geometry`; with `extra_pixels` they are composited only at those
    pixels (0 elsewhere; the torch backend composites all, then masks). `backend`: "torch" or
    "compiled" (CPU tensors only).
    """
    if backend not in ("torch", "compiled"):
        raise ValueError(f"backend must be 'torch' or 'compiled', got {backend!r}")
    if extra_pixels is not None and (extra_colors is None or extra_pixels.shape != (viewmats.shape[0], height, width)):
        raise ValueError(
            f"extra_pixels needs extra_colors and the shape [C, H, W] = [{viewmats.shape[0]}, {height}, {width}], "
            f"got {list(extra_pixels.shape)}"
        )
    if packed or camera_model != "pinhole" or sparse_grad or unsupported:
        extra = ", ".join(sorted(unsupported))
        raise NotImplementedError(
            "The torch rasterizer supports packed=False, camera_model='pinhole', sparse_grad=False"
            + (f"; unsupported arguments: {extra}" if extra else "")
        )
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize_mode must be 'classic' or 'antialiased', got {rasterize_mode!r}")
    N, C = means.shape[0], viewmats.shape[0]

    # the compiled backend also projects, colours and bins in its kernels (no camera gradients there)
    compiled_geometry = backend == "compiled" and not (viewmats.requires_grad or Ks.requires_grad)
    if compiled_geometry:
        from trace3d_ns.cuda import compiled

    project = compiled.project if compiled_geometry else project_gaussians
    proj = project(
        means, quats, scales, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane,
        far_plane=far_plane, radius_clip=radius_clip, calc_compensations=rasterize_mode == "antialiased",
    )
    opacities_c = opacities.expand(C, N)  # [C, N]
    if proj.compensations is not None:
        opacities_c = opacities_c * proj.compensations

    if sh_degree is None:
        colors_c = colors.expand(C, -1, -1) if colors.dim() == 2 else colors  # [C, N, D]
    else:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
        if compiled_geometry and colors.dim() == 3:
            if colors.shape[-2] < (sh_degree + 1) ** 2:
                raise ValueError(f"SH degree {sh_degree} needs {(sh_degree + 1) ** 2} coefficients, got {colors.shape[-2]}")
            colors_c = compiled.sh_colors(sh_degree, means, campos.detach(), colors)  # [C, N, 3]
        else:
            dirs = means[None] - campos[:, None]  # [C, N, 3]
            shs = colors.expand(C, -1, -1, -1) if colors.dim() == 3 else colors  # [C, N, K, 3]
            colors_c = torch.clamp_min(spherical_harmonics(sh_degree, dirs, shs) + 0.5, 0.0)  # [C, N, 3]

    if render_mode in ("RGB+D", "RGB+ED"):
        colors_c = torch.cat([colors_c, proj.depths[..., None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        colors_c = proj.depths[..., None]
        if backgrounds is not None:
            backgrounds = backgrounds.new_zeros(C, 1)

    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    binning = compiled.intersect_tiles if compiled_geometry else intersect_tiles
    isect = binning(proj.means2d, proj.radii, proj.depths, tile_size, tile_width, tile_height)
    absgrad_buffer = torch.zeros_like(proj.means2d) if absgrad else None  # [C, N, 2]
    composite = _composite_compiled if backend == "compiled" else _composite_torch
    render_colors, render_alphas, extra_render = composite(
        proj.means2d, proj.conics, opacities_c, colors_c, backgrounds, proj.radii, proj.depths, isect, width, height,
        tile_size, absgrad_buffer, extra_colors, extra_grad_to_geometry, extra_pixels,
    )  # [C, H, W, X], [C, H, W, 1], [C, H, W, E] or None

    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], dim=-1
        )
    if absgrad_buffer is not None:
        proj.means2d.absgrad = absgrad_buffer
    meta = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": proj.radii,
        "means2d": proj.means2d,
        "depths": proj.depths,
        "conics": proj.conics,
        "opacities": opacities_c,
        "tile_width": tile_width,
        "tile_height": tile_height,
        "tiles_per_gauss": isect.tiles_per_gauss,
        "isect_ids": isect.isect_ids,
        "flatten_ids": isect.flatten_ids,
        "isect_offsets": isect.isect_offsets,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": C,
    }
    if extra_render is not None:
        meta["extra_render"] = extra_render  # [C, H, W, E]
    return render_colors, render_alphas, meta


def _composite_torch(
    means2d, conics, opacities, colors, backgrounds, radii, depths, isect, width, height, tile_size, absgrad_buffer,
    extra_colors, extra_grad_to_geometry, extra_pixels,
):
    """Per camera: the contributing pairs, then `composite_pairs` with autograd."""
    renders, alphas, extras = [], [], []
    for c in range(colors.shape[0]):
        gids, pids = contributing_pairs(
            means2d[c].detach(), conics[c].detach(), opacities[c].detach(), radii[c], depths[c].detach(),
            width, height, tile_size,
        )
        image, alpha, _, extra = composite_pairs(
            gids, pids, means2d[c], conics[c], opacities[c], colors[c], width, height,
            absgrad=None if absgrad_buffer is None else absgrad_buffer[c],
            extra_colors=extra_colors, extra_grad_to_geometry=extra_grad_to_geometry,
        )
        if extra is not None:
            extras.append(extra.reshape(height, width, -1))
        if backgrounds is not None:
            image = image + (1.0 - alpha)[:, None] * backgrounds[c]
        renders.append(image.reshape(height, width, -1))
        alphas.append(alpha.reshape(height, width, 1))
    if not extras:
        return torch.stack(renders), torch.stack(alphas), None
    return torch.stack(renders), torch.stack(alphas), mask_extra(torch.stack(extras), extra_pixels)


def _composite_compiled(
    means2d, conics, opacities, colors, backgrounds, radii, depths, isect, width, height, tile_size, absgrad_buffer,
    extra_colors, extra_grad_to_geometry, extra_pixels,
):
    """All cameras in one pass of the compiled kernels. Extra colours at `extra_pixels` whose gradients
    stay off the geometry: from the render's list of visits there (`compiled.composite(sparse_pairs=
    True)`), as index sums with the visits' weights. Otherwise they ride along as channels with a zero
    background, their gradients kept off the geometry unless asked, composited only at `extra_pixels`
    when given."""
    from trace3d_ns.cuda import compiled

    C, _, D = colors.shape
    if extra_colors is not None and extra_pixels is not None and not extra_grad_to_geometry:
        # a few pixels of channels that do not move the geometry: composited from the visits the
        # render lists there, with their (fixed) weights; the tile kernels stay on the colours alone
        render, alpha, pixel, gaussian, weight = compiled.composite(
            means2d, conics, opacities, colors, backgrounds, isect, width, height, tile_size, absgrad=absgrad_buffer,
            sparse_pixels=extra_pixels, sparse_pairs=True,
        )
        features = extra_colors.to(colors.dtype)  # [N, E]
        extra = compiled.weighted_rows(features, pixel, gaussian, weight, C * width * height)  # [C*H*W, E], 0 elsewhere
        return render, alpha, extra.reshape(C, height, width, -1)
    channels = colors
    if extra_colors is not None:
        channels = torch.cat([colors, extra_colors.expand(C, -1, -1).to(colors.dtype)], dim=-1)  # [C, N, D + E]
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, extra_colors.shape[-1])], dim=-1)
    geometry = channels.shape[-1] if extra_grad_to_geometry or extra_colors is None else D
    render, alpha = compiled.composite(
        means2d, conics, opacities, channels, backgrounds, isect, width, height, tile_size,
        absgrad=absgrad_buffer, geometry_channels=geometry, sparse_from=D, sparse_pixels=extra_pixels,
    )
    if extra_colors is None:
        return render, alpha, None
    return render[..., :D], alpha, render[..., D:]


def mask_extra(extra: Tensor, extra_pixels: Optional[Tensor]) -> Tensor:
    """extra [C, H, W, E] with 0 outside `extra_pixels` [C, H, W] bool (None: unchanged)."""
    if extra_pixels is None:
        return extra
    if extra_pixels.shape != extra.shape[:3]:
        raise ValueError(f"extra_pixels must be [C, H, W] = {list(extra.shape[:3])}, got {list(extra_pixels.shape)}")
    return extra * extra_pixels[..., None].to(extra.dtype)
