"""Distinct colours for instance ids (0 = black)."""

from __future__ import annotations

import torch
from torch import Tensor


def instance_palette(num_ids: int, device: torch.device | str = "cpu") -> Tensor:
    """[num_ids, 3] colours in [0, 1]: id 0 black, the rest spread by the golden-ratio hue walk."""
    ids = torch.arange(num_ids, dtype=torch.float64)
    hue = (ids * 0.6180339887498949) % 1.0
    sat = 0.55 + 0.45 * ((ids * 0.37) % 1.0)
    val = 0.7 + 0.3 * ((ids * 0.53) % 1.0)
    k = (torch.stack([5.0 + hue * 6, 3.0 + hue * 6, 1.0 + hue * 6], dim=-1)) % 6
    rgb = val[:, None] - val[:, None] * sat[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))
    rgb[0] = 0.0
    return rgb.float().to(device)


def colorize_ids(ids: Tensor) -> Tensor:
    """[...] int ids (>= 0) -> [..., 3] colours."""
    ids = ids.long().clamp(min=0)
    return instance_palette(int(ids.max()) + 1 if ids.numel() else 1, ids.device)[ids]
