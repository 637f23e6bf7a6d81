"""Brute-force per-pixel reference rasterizer, for tests and benchmarks.

Every pixel composites every Gaussian in global depth order. Projection and SH come from gsplat's
own pure-torch implementation (`gsplat.cuda._torch_impl`), not from our code, and the same
cut-offs as the CUDA kernel apply: the Gaussian's 3-sigma tile box, sigma >= 0, alpha >= 1/255,
alpha <= 0.999, and stop before transmittance would reach 1e-4. O(N x pixels) time; memory is
bounded by evaluating pixel chunks under activation checkpointing.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trace3d_ns.cuda.tiles import ALPHA_MAX, ALPHA_MIN, TRANSMITTANCE_MIN


def _project_with_gsplat_torch(means, quats, scales, viewmat, K, width, height, eps2d, near, far):
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmat[None], K[None], width, height, eps2d=eps2d, near_plane=near, far_plane=far
    )
    return radii[0], means2d[0], depths[0], conics[0]


def _composite_chunk(px, py, tile_x, tile_y, means2d, conics, opacities, colors, box_min, box_max):
    dx = means2d[None, :, 0] - px[:, None]  # [p, N]
    dy = means2d[None, :, 1] - py[:, None]
    sigma = 0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) + conics[:, 1] * dx * dy
    alpha = torch.clamp(opacities * torch.exp(-sigma), max=ALPHA_MAX)
    in_box = (
        (tile_x[:, None] >= box_min[:, 0]) & (tile_x[:, None] < box_max[:, 0])
        & (tile_y[:, None] >= box_min[:, 1]) & (tile_y[:, None] < box_max[:, 1])
    )
    valid = in_box & (sigma >= 0) & (alpha >= ALPHA_MIN)
    a = torch.where(valid, alpha, torch.zeros_like(alpha))
    t_after = torch.cumprod(1.0 - a.double(), dim=1)
    used = valid & (t_after > TRANSMITTANCE_MIN)
    a = torch.where(used, alpha, torch.zeros_like(alpha))
    t_incl = torch.cumprod(1.0 - a, dim=1)
    t_before = torch.cat([torch.ones_like(t_incl[:, :1]), t_incl[:, :-1]], dim=1)
    weights = a * t_before  # [p, N]
    return weights @ colors, weights.sum(dim=1), weights


def reference_rasterize(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D] or [N, K, 3] with sh_degree
    viewmat: Tensor,  # [4, 4]
    K: Tensor,  # [3, 3]
    width: int,
    height: int,
    sh_degree: Optional[int] = None,
    background: Optional[Tensor] = None,  # [D]
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    tile_size: int = 16,
    pixels_per_chunk: int = 1024,
    return_weights: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """One camera. Returns (colours [H, W, D], alphas [H, W, 1], depths [H, W, 1] expected depth,
    dense weights [H*W, N] in original Gaussian order if `return_weights`)."""
    radii, means2d, depths, conics = _project_with_gsplat_torch(
        means, quats, scales, viewmat, K, width, height, eps2d, near_plane, far_plane
    )
    if sh_degree is not None:
        from gsplat.cuda._torch_impl import _spherical_harmonics

        campos = torch.linalg.inv(viewmat)[:3, 3]
        colors = torch.clamp_min(_spherical_harmonics(sh_degree, means - campos, colors) + 0.5, 0.0)
    colors = torch.cat([colors, depths[:, None]], dim=-1)  # depth rides along as the last channel

    order = torch.argsort(depths.detach(), stable=True)
    visible = order[radii[order] > 0]
    centre = means2d.detach()[visible] / tile_size
    r = (radii[visible] / tile_size)[:, None]
    limits = torch.tensor([math.ceil(width / tile_size), math.ceil(height / tile_size)])
    box_min = torch.minimum(torch.floor(centre - r).clamp(min=0), limits)
    box_max = torch.minimum(torch.ceil(centre + r).clamp(min=0), limits)
    args = (means2d[visible], conics[visible], opacities[visible], colors[visible], box_min, box_max)

    pix = torch.arange(width * height)
    image_chunks, alpha_chunks, weight_chunks = [], [], []
    for start in range(0, pix.numel(), pixels_per_chunk):
        p = pix[start : start + pixels_per_chunk]
        x, y = p % width, p // width
        inputs = (x + 0.5, y + 0.5, x // tile_size, y // tile_size) + args
        if torch.is_grad_enabled() and not return_weights:
            img, alp, _ = checkpoint(_composite_chunk, *inputs, use_reentrant=False)
        else:
            img, alp, w = _composite_chunk(*inputs)
            if return_weights:
                dense = w.new_zeros(p.numel(), means.shape[0])
                dense[:, visible] = w
                weight_chunks.append(dense)
        image_chunks.append(img)
        alpha_chunks.append(alp)
    image = torch.cat(image_chunks).reshape(height, width, -1)
    alphas = torch.cat(alpha_chunks).reshape(height, width, 1)
    rgb, depth = image[..., :-1], image[..., -1:] / alphas.clamp(min=1e-10)
    if background is not None:
        rgb = rgb + (1.0 - alphas) * background
    return rgb, alphas, depth, (torch.cat(weight_chunks) if return_weights else None)
