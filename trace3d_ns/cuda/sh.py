"""Real spherical harmonics colour evaluation up to degree 3 (the 3DGS / gsplat convention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """SH basis values at unit directions. [..., 3] -> [..., (degree + 1) ** 2]."""
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be in [0, 3], got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, _C0)]
    if degree >= 1:
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _C2[0] * x * y, _C2[1] * y * z, _C2[2] * (2 * zz - xx - yy), _C2[3] * x * z, _C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            _C3[0] * y * (3 * xx - yy), _C3[1] * x * y * z, _C3[2] * y * (4 * zz - xx - yy),
            _C3[3] * z * (2 * zz - 3 * xx - 3 * yy), _C3[4] * x * (4 * zz - xx - yy),
            _C3[5] * z * (xx - yy), _C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """View-dependent colour. dirs [..., 3] (any length), coeffs [..., K, 3] with K >= (degree+1)^2 -> [..., 3]."""
    n = (degree + 1) ** 2
    if coeffs.shape[-2] < n:
        raise ValueError(f"SH degree {degree} needs {n} coefficients, got {coeffs.shape[-2]}")
    basis = sh_basis(degree, F.normalize(dirs, dim=-1))  # [..., n]
    return (basis[..., None] * coeffs[..., :n, :]).sum(dim=-2)
