"""EWA projection of 3D Gaussians to the image plane (pinhole), with gsplat 1.4.0 semantics.

Pure torch, differentiable, device-agnostic. Mirrors `gsplat.fully_fused_projection(packed=False)`:
perspective Jacobian with the 1.3x-FOV clamp, `eps2d` blur, 3-sigma radius, near/far culling,
`radius_clip` and off-screen culling (radius 0 = culled).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class Projection(NamedTuple):
    radii: Tensor  # [C, N] int32, 0 = culled
    means2d: Tensor  # [C, N, 2] pixel coordinates
    depths: Tensor  # [C, N] camera-space z
    conics: Tensor  # [C, N, 3] upper triangle of the inverse 2D covariance (a, b, c)
    compensations: Optional[Tensor]  # [C, N] antialiasing opacity factor, or None


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices from (unnormalised) wxyz quaternions. [N, 4] -> [N, 3, 3]."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariance R S S^T R^T. [N, 4], [N, 3] -> [N, 3, 3]."""
    rs = quat_to_rotmat(quats) * scales[..., None, :]  # [N, 3, 3]
    return rs @ rs.transpose(-1, -2)


def project_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    viewmats: Tensor,  # [C, 4, 4] world-to-camera
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    calc_compensations: bool = False,
) -> Projection:
    """Projects Gaussians into C pinhole cameras."""
    R = viewmats[:, :3, :3]  # [C, 3, 3]
    t = viewmats[:, :3, 3]  # [C, 3]
    means_c = torch.einsum("cij,nj->cni", R, means) + t[:, None]  # [C, N, 3]
    covars_c = torch.einsum("cij,njk,clk->cnil", R, covariance_3d(quats, scales), R)  # [C, N, 3, 3]
    # Gaussians at or behind the near plane are culled; their projection divides by a depth that
    # may be 0, so they are cut from the graph (0 * inf would put NaN into the parameters' grads).
    in_front = (means_c[..., 2] > near_plane).detach()  # [C, N]
    means_c = torch.where(in_front[..., None], means_c, means_c.detach())
    covars_c = torch.where(in_front[..., None, None], covars_c, covars_c.detach())

    tx, ty, tz = means_c.unbind(-1)  # [C, N]
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]  # [C, 1]
    means2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], dim=-1)  # [C, N, 2]

    # The Jacobian is evaluated at a point clamped to 1.3x the field of view (as gsplat does),
    # so Gaussians far outside the frustum do not get huge screen footprints.
    margin_x, margin_y = 0.3 * 0.5 * width / fx, 0.3 * 0.5 * height / fy
    u = torch.clamp(tx / tz, min=-(cx / fx + margin_x), max=(width - cx) / fx + margin_x)
    v = torch.clamp(ty / tz, min=-(cy / fy + margin_y), max=(height - cy) / fy + margin_y)
    zero = torch.zeros_like(tz)
    J = torch.stack([fx / tz, zero, -fx * u / tz, zero, fy / tz, -fy * v / tz], dim=-1)
    J = J.reshape(tz.shape + (2, 3))  # [C, N, 2, 3]
    cov2d = J @ covars_c @ J.transpose(-1, -2)  # [C, N, 2, 2]

    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det_blur = a * c - b * b
    det = det_blur.clamp(min=1e-10)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)  # [C, N, 3]
    compensations = torch.sqrt(torch.clamp(det_orig / det, min=0.0)) if calc_compensations else None

    with torch.no_grad():
        half_trace = 0.5 * (a + c)
        radius = torch.ceil(3.0 * torch.sqrt(half_trace + torch.sqrt((half_trace**2 - det).clamp(min=0.01))))
        keep = (tz > near_plane) & (tz < far_plane) & (det_blur > 0) & (radius > radius_clip)
        x, y = means2d[..., 0], means2d[..., 1]
        keep &= (x + radius > 0) & (x - radius < width) & (y + radius > 0) & (y - radius < height)
        radii = torch.where(keep, radius, torch.zeros_like(radius)).int()
    # As in gsplat, a culled Gaussian's outputs carry no gradient.
    means2d = torch.where(keep[..., None], means2d, means2d.detach())
    tz = torch.where(keep, tz, tz.detach())
    conics = torch.where(keep[..., None], conics, conics.detach())
    if compensations is not None:
        compensations = torch.where(keep, compensations, compensations.detach())
    return Projection(radii, means2d, tz, conics, compensations)
