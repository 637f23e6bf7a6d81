"""Random Gaussian scenes and cameras for tests."""

from __future__ import annotations

import math

import torch


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """OpenCV world-to-camera matrix (x right, y down, z forward) looking from eye at target. [4, 4]"""
    eye, target, up = (torch.tensor(v, dtype=torch.float32) for v in (eye, target, up))
    forward = torch.nn.functional.normalize(target - eye, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up), dim=0)
    down = torch.linalg.cross(forward, right)
    R = torch.stack([right, down, forward])  # rows: camera axes in world
    view = torch.eye(4)
    view[:3, :3] = R
    view[:3, 3] = -R @ eye
    return view


def intrinsics(width: int, height: int, fov_deg: float = 60.0) -> torch.Tensor:
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def random_gaussians(n: int, seed: int = 0, sh_degree: int | None = None, extent: float = 1.0, scale=(0.02, 0.15)):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 2 * extent
    quats = torch.randn(n, 4, generator=g)
    scales = scale[0] + torch.rand(n, 3, generator=g) * (scale[1] - scale[0])
    opacities = 0.05 + 0.95 * torch.rand(n, generator=g)
    if sh_degree is None:
        colors = torch.rand(n, 3, generator=g)
    else:
        colors = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    return means, quats, scales, opacities, colors
