"""Torch twin of gsplat's `rasterize_to_indices_in_range` (same arguments, same outputs).

gsplat's version is CUDA-only. This one runs anywhere, so the GPU code path of
`trace3d_ns.rendering.contributions` (which consumes gsplat's output format) is exercised on CPU.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from trace3d_ns.cuda.tiles import contributing_pairs_tile_sweep


@torch.no_grad()
def rasterize_to_indices_in_range(
    range_start: int,
    range_end: int,
    transmittances: Tensor,  # [C, H, W]
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    image_width: int,
    image_height: int,
    tile_size: int,
    isect_offsets: Tensor,  # [C, tile_height, tile_width]
    flatten_ids: Tensor,  # [M] c * N + n
) -> Tuple[Tensor, Tensor, Tensor]:
    """(gaussian_ids, pixel_ids, camera_ids) of the pairs composited from depth-batches
    [range_start, range_end) of each tile (a batch is tile_size^2 intersections), starting from
    the given transmittances. Grouped by (camera, pixel), front to back."""
    C, N = means2d.shape[:2]
    tile_height, tile_width = isect_offsets.shape[1:]
    n_tiles = tile_height * tile_width
    device = means2d.device
    starts = isect_offsets.reshape(-1).long()  # [C * n_tiles]
    ends = torch.cat([starts[1:], torch.tensor([flatten_ids.numel()], device=device)])
    bins = torch.repeat_interleave(torch.arange(C * n_tiles, device=device), ends - starts)  # [M]
    rank = torch.arange(flatten_ids.numel(), device=device) - starts[bins]
    batch = tile_size * tile_size
    in_range = (rank >= range_start * batch) & (rank < range_end * batch)

    out_g, out_p, out_c = [], [], []
    for c in range(C):
        sel = in_range & (bins // n_tiles == c)
        gids, pids = contributing_pairs_tile_sweep(
            means2d[c], conics[c], opacities[c], flatten_ids[sel].long() - c * N, bins[sel] - c * n_tiles,
            image_width, image_height, tile_size, tile_width,
            initial_transmittance=transmittances[c].reshape(-1),
        )
        out_g.append(gids)
        out_p.append(pids + c * image_width * image_height)
        out_c.append(torch.full_like(gids, c))
    return torch.cat(out_g), torch.cat(out_p) % (image_width * image_height), torch.cat(out_c)
