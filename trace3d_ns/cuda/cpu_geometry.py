"""Compiled (numba) CPU kernels for the per-Gaussian stages: EWA projection, spherical harmonics
and tile binning, with their backward passes. Parallel over Gaussians (`prange`).

Same semantics as the torch references in `projection.py`, `sh.py` and `tiles.intersect_tiles`
(gsplat 1.4.0's): the tests hold them equal, gradients included. The backward passes are the
chain rule of the forward written out per Gaussian, summed over cameras inside the loop (no races).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

CHUNK = 256
"""Gaussians per parallel work item (scratch arrays are allocated once per item)."""

_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C20, _C21, _C22, _C23, _C24 = 1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396
_C30, _C31, _C32, _C33, _C34, _C35, _C36 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


@njit(cache=True)
def _rotation(qw, qx, qy, qz):
    """Normalised quaternion (w, x, y, z), its norm, and the rotation matrix as a tuple of 9."""
    norm = math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    inv = 1.0 / max(norm, 1e-12)
    w, x, y, z = qw * inv, qx * inv, qy * inv, qz * inv
    R = (
        1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y),
        2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x),
        2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y),
    )
    return w, x, y, z, norm, R


@njit(cache=True)
def _covariance(R, s0, s1, s2):
    """World covariance (R S)(R S)^T as (xx, xy, xz, yy, yz, zz), and M = R S."""
    m = (R[0] * s0, R[1] * s1, R[2] * s2, R[3] * s0, R[4] * s1, R[5] * s2, R[6] * s0, R[7] * s1, R[8] * s2)
    sxx = m[0] * m[0] + m[1] * m[1] + m[2] * m[2]
    sxy = m[0] * m[3] + m[1] * m[4] + m[2] * m[5]
    sxz = m[0] * m[6] + m[1] * m[7] + m[2] * m[8]
    syy = m[3] * m[3] + m[4] * m[4] + m[5] * m[5]
    syz = m[3] * m[6] + m[4] * m[7] + m[5] * m[8]
    szz = m[6] * m[6] + m[7] * m[7] + m[8] * m[8]
    return (sxx, sxy, sxz, syy, syz, szz), m


@njit(cache=True)
def _sym_at(S, i, j):
    """Entry (i, j) of a symmetric 3x3 stored as (xx, xy, xz, yy, yz, zz)."""
    if i > j:
        i, j = j, i
    if i == 0:
        return S[j]
    if i == 1:
        return S[2 + j]
    return S[5]


@njit(cache=True)
def _to_camera(V, means, n, S, RS, Sc):
    """Camera-space mean (tx, ty, tz) of Gaussian n, and its camera covariance R S R^T written to
    Sc [3, 3] (RS [3, 3]: scratch)."""
    tx = V[0, 0] * means[n, 0] + V[0, 1] * means[n, 1] + V[0, 2] * means[n, 2] + V[0, 3]
    ty = V[1, 0] * means[n, 0] + V[1, 1] * means[n, 1] + V[1, 2] * means[n, 2] + V[1, 3]
    tz = V[2, 0] * means[n, 0] + V[2, 1] * means[n, 1] + V[2, 2] * means[n, 2] + V[2, 3]
    for i in range(3):
        for j in range(3):
            RS[i, j] = V[i, 0] * _sym_at(S, 0, j) + V[i, 1] * _sym_at(S, 1, j) + V[i, 2] * _sym_at(S, 2, j)
    for i in range(3):
        for j in range(3):
            Sc[i, j] = RS[i, 0] * V[j, 0] + RS[i, 1] * V[j, 1] + RS[i, 2] * V[j, 2]
    return tx, ty, tz


@njit(cache=True, inline="always")
def _cov2d(Sc, j00, j02, j11, j12):
    """(a, b, c) of the image-plane covariance [[a, b], [b, c]] = J Sc J^T, J = [[j00, 0, j02], [0, j11, j12]]
    the projection's Jacobian (b averaged over both off-diagonal entries)."""
    a0 = j00 * (j00 * Sc[0, 0] + j02 * Sc[2, 0]) + j02 * (j00 * Sc[0, 2] + j02 * Sc[2, 2])
    b01 = j00 * (j11 * Sc[0, 1] + j12 * Sc[0, 2]) + j02 * (j11 * Sc[2, 1] + j12 * Sc[2, 2])
    b10 = j11 * (j00 * Sc[1, 0] + j02 * Sc[1, 2]) + j12 * (j00 * Sc[2, 0] + j02 * Sc[2, 2])
    c0 = j11 * (j11 * Sc[1, 1] + j12 * Sc[2, 1]) + j12 * (j11 * Sc[1, 2] + j12 * Sc[2, 2])
    return a0, 0.5 * (b01 + b10), c0


@njit(parallel=True, cache=True)
def project_forward(
    means,  # [N, 3] float64
    quats,  # [N, 4]
    scales,  # [N, 3]
    viewmats,  # [C, 4, 4]
    Ks,  # [C, 3, 3]
    width,
    height,
    eps2d,
    near_plane,
    far_plane,
    radius_clip,
    radii,  # [C, N] int32 out
    means2d,  # [C, N, 2] out
    depths,  # [C, N] out
    conics,  # [C, N, 3] out
    compensations,  # [C, N] out
):
    N = means.shape[0]
    C = viewmats.shape[0]
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        RS = np.empty((3, 3))
        Sc = np.empty((3, 3))
        for n in range(chunk * CHUNK, min(N, (chunk + 1) * CHUNK)):
            _, _, _, _, _, Rq = _rotation(quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3])
            S, _ = _covariance(Rq, scales[n, 0], scales[n, 1], scales[n, 2])
            for cam in range(C):
                V = viewmats[cam]
                fx, fy, cx, cy = Ks[cam, 0, 0], Ks[cam, 1, 1], Ks[cam, 0, 2], Ks[cam, 1, 2]
                tx, ty, tz = _to_camera(V, means, n, S, RS, Sc)
                mx = fx * tx / tz + cx
                my = fy * ty / tz + cy
                margin_x, margin_y = 0.3 * 0.5 * width / fx, 0.3 * 0.5 * height / fy
                u = min(max(tx / tz, -(cx / fx + margin_x)), (width - cx) / fx + margin_x)
                v = min(max(ty / tz, -(cy / fy + margin_y)), (height - cy) / fy + margin_y)
                j00, j02, j11, j12 = fx / tz, -fx * u / tz, fy / tz, -fy * v / tz
                a0, b, c0 = _cov2d(Sc, j00, j02, j11, j12)
                det_orig = a0 * c0 - b * b
                a, c = a0 + eps2d, c0 + eps2d
                det_blur = a * c - b * b
                det = max(det_blur, 1e-10)
                conics[cam, n, 0] = c / det
                conics[cam, n, 1] = -b / det
                conics[cam, n, 2] = a / det
                compensations[cam, n] = math.sqrt(max(det_orig / det, 0.0))
                means2d[cam, n, 0] = mx
                means2d[cam, n, 1] = my
                depths[cam, n] = tz
                half_trace = 0.5 * (a + c)
                radius = math.ceil(3.0 * math.sqrt(half_trace + math.sqrt(max(half_trace * half_trace - det, 0.01))))
                keep = tz > near_plane and tz < far_plane and det_blur > 0.0 and radius > radius_clip
                keep = keep and mx + radius > 0 and mx - radius < width and my + radius > 0 and my - radius < height
                radii[cam, n] = np.int32(radius) if keep else 0


@njit(parallel=True, cache=True)
def project_backward(
    means,  # [N, 3] float64
    quats,  # [N, 4]
    scales,  # [N, 3]
    viewmats,  # [C, 4, 4]
    Ks,  # [C, 3, 3]
    width,
    height,
    eps2d,
    radii,  # [C, N] int32, 0 = culled: no gradient (as gsplat)
    v_means2d,  # [C, N, 2]
    v_depths,  # [C, N]
    v_conics,  # [C, N, 3]
    v_compensations,  # [C, N]
    v_means,  # [N, 3] out
    v_quats,  # [N, 4] out
    v_scales,  # [N, 3] out
):
    N = means.shape[0]
    C = viewmats.shape[0]
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        RS = np.empty((3, 3))
        Sc = np.empty((3, 3))
        J = np.empty((2, 3))
        cov = np.empty((2, 2))
        vcov = np.empty((2, 2))
        vSc = np.empty((3, 3))
        W = np.empty((3, 3))
        vS = np.empty((3, 3))  # dL / d world covariance
        vM = np.empty((3, 3))
        v_s = np.empty(3)
        vR = np.empty(9)
        for n in range(chunk * CHUNK, min(N, (chunk + 1) * CHUNK)):
            w, x, y, z, qnorm, Rq = _rotation(quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3])
            s0, s1, s2 = scales[n, 0], scales[n, 1], scales[n, 2]
            S, M = _covariance(Rq, s0, s1, s2)
            vS[:] = 0.0
            vm0 = 0.0
            vm1 = 0.0
            vm2 = 0.0
            seen = False
            for cam in range(C):
                if radii[cam, n] <= 0:
                    continue
                seen = True
                V = viewmats[cam]
                fx, fy, cx, cy = Ks[cam, 0, 0], Ks[cam, 1, 1], Ks[cam, 0, 2], Ks[cam, 1, 2]
                tx, ty, tz = _to_camera(V, means, n, S, RS, Sc)
                margin_x, margin_y = 0.3 * 0.5 * width / fx, 0.3 * 0.5 * height / fy
                lo_x, hi_x = -(cx / fx + margin_x), (width - cx) / fx + margin_x
                lo_y, hi_y = -(cy / fy + margin_y), (height - cy) / fy + margin_y
                rx, ry = tx / tz, ty / tz
                u = min(max(rx, lo_x), hi_x)
                v = min(max(ry, lo_y), hi_y)
                j00, j02, j11, j12 = fx / tz, -fx * u / tz, fy / tz, -fy * v / tz
                a0, b, c0 = _cov2d(Sc, j00, j02, j11, j12)
                det_orig = a0 * c0 - b * b
                a, c = a0 + eps2d, c0 + eps2d
                det_blur = a * c - b * b
                clamped = not (det_blur > 1e-10)
                det = 1e-10 if clamped else det_blur
                g0, g1, g2 = v_conics[cam, n, 0], v_conics[cam, n, 1], v_conics[cam, n, 2]
                inv, inv2 = 1.0 / det, 1.0 / (det * det)
                # conic = (c, -b, a) / det, det = a c - b^2 (constant where clamped)
                va = g2 * inv
                vb = -g1 * inv
                vc = g0 * inv
                if not clamped:
                    v_det = -(g0 * c - g1 * b + g2 * a) * inv2
                    va += v_det * c
                    vb += v_det * (-2.0 * b)
                    vc += v_det * a
                ratio = det_orig * inv
                if v_compensations.shape[0] > 0 and ratio > 0.0:
                    v_ratio = v_compensations[cam, n] * 0.5 / math.sqrt(ratio)
                    # ratio = det_orig / det, det_orig = a0 c0 - b^2
                    va += v_ratio * c0 * inv
                    vc += v_ratio * a0 * inv
                    vb += v_ratio * (-2.0 * b) * inv
                    if not clamped:
                        v_det2 = -v_ratio * det_orig * inv2
                        va += v_det2 * c
                        vc += v_det2 * a
                        vb += v_det2 * (-2.0 * b)
                vb2 = 0.5 * vb  # vcov = [[va, vb2], [vb2, vc]]
                # P = vcov J [2, 3]
                p00, p01, p02 = va * j00, vb2 * j11, va * j02 + vb2 * j12
                p10, p11, p12 = vb2 * j00, vc * j11, vb2 * j02 + vc * j12
                # cov = J Sc J^T: v_Sc = J^T P, v_J = 2 P Sc (vcov, Sc symmetric)
                vSc[0, 0], vSc[0, 1], vSc[0, 2] = j00 * p00, j00 * p01, j00 * p02
                vSc[1, 0], vSc[1, 1], vSc[1, 2] = j11 * p10, j11 * p11, j11 * p12
                vSc[2, 0], vSc[2, 1], vSc[2, 2] = j02 * p00 + j12 * p10, j02 * p01 + j12 * p11, j02 * p02 + j12 * p12
                vJ00 = 2.0 * (p00 * Sc[0, 0] + p01 * Sc[1, 0] + p02 * Sc[2, 0])
                vJ02 = 2.0 * (p00 * Sc[0, 2] + p01 * Sc[1, 2] + p02 * Sc[2, 2])
                vJ11 = 2.0 * (p10 * Sc[0, 1] + p11 * Sc[1, 1] + p12 * Sc[2, 1])
                vJ12 = 2.0 * (p10 * Sc[0, 2] + p11 * Sc[1, 2] + p12 * Sc[2, 2])
                # Sc = V S V^T: v_S += V^T vSc V, as V^T (vSc V)
                for k in range(3):
                    for j in range(3):
                        W[k, j] = vSc[k, 0] * V[0, j] + vSc[k, 1] * V[1, j] + vSc[k, 2] * V[2, j]
                for i in range(3):
                    for j in range(3):
                        vS[i, j] += V[0, i] * W[0, j] + V[1, i] * W[1, j] + V[2, i] * W[2, j]
                # J(tz, u, v), u = clamp(tx / tz), v = clamp(ty / tz)
                vtx = v_means2d[cam, n, 0] * fx / tz
                vty = v_means2d[cam, n, 1] * fy / tz
                vtz = -(v_means2d[cam, n, 0] * fx * tx + v_means2d[cam, n, 1] * fy * ty) / (tz * tz) + v_depths[cam, n]
                vtz += (-vJ00 * fx - vJ11 * fy + vJ02 * fx * u + vJ12 * fy * v) / (tz * tz)
                vu = -vJ02 * fx / tz
                vv = -vJ12 * fy / tz
                if rx >= lo_x and rx <= hi_x:
                    vtx += vu / tz
                    vtz -= vu * tx / (tz * tz)
                if ry >= lo_y and ry <= hi_y:
                    vty += vv / tz
                    vtz -= vv * ty / (tz * tz)
                vm0 += V[0, 0] * vtx + V[1, 0] * vty + V[2, 0] * vtz
                vm1 += V[0, 1] * vtx + V[1, 1] * vty + V[2, 1] * vtz
                vm2 += V[0, 2] * vtx + V[1, 2] * vty + V[2, 2] * vtz
            v_means[n, 0], v_means[n, 1], v_means[n, 2] = vm0, vm1, vm2
            if not seen:
                v_quats[n, :] = 0.0
                v_scales[n, :] = 0.0
                continue
            # S = M M^T: v_M = (vS + vS^T) M
            for i in range(3):
                for j in range(3):
                    s = 0.0
                    for k in range(3):
                        s += (vS[i, k] + vS[k, i]) * M[3 * k + j]
                    vM[i, j] = s
            # M = Rq diag(s)
            v_s[:] = 0.0
            for i in range(3):
                for j in range(3):
                    v_s[j] += vM[i, j] * Rq[3 * i + j]
                    vR[3 * i + j] = vM[i, j] * (s0 if j == 0 else (s1 if j == 1 else s2))
            v_scales[n, 0], v_scales[n, 1], v_scales[n, 2] = v_s[0], v_s[1], v_s[2]
            # rotation of the normalised quaternion
            vw = 2.0 * (-z * vR[1] + y * vR[2] + z * vR[3] - x * vR[5] - y * vR[6] + x * vR[7])
            vx = 2.0 * (y * vR[1] + z * vR[2] + y * vR[3] - 2.0 * x * vR[4] - w * vR[5] + z * vR[6] + w * vR[7] - 2.0 * x * vR[8])
            vy = 2.0 * (-2.0 * y * vR[0] + x * vR[1] + w * vR[2] + x * vR[3] + z * vR[5] - w * vR[6] + z * vR[7] - 2.0 * y * vR[8])
            vz = 2.0 * (-2.0 * z * vR[0] - w * vR[1] + x * vR[2] + w * vR[3] - 2.0 * z * vR[4] + y * vR[5] + x * vR[6] + y * vR[7])
            dot = w * vw + x * vx + y * vy + z * vz
            inv = 1.0 / max(qnorm, 1e-12)
            v_quats[n, 0] = (vw - w * dot) * inv
            v_quats[n, 1] = (vx - x * dot) * inv
            v_quats[n, 2] = (vy - y * dot) * inv
            v_quats[n, 3] = (vz - z * dot) * inv


@njit(cache=True)
def _sh_basis(degree, x, y, z, out):
    out[0] = _C0
    if degree >= 1:
        out[1], out[2], out[3] = -_C1 * y, _C1 * z, -_C1 * x
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out[4], out[5], out[6] = _C20 * x * y, _C21 * y * z, _C22 * (2.0 * zz - xx - yy)
        out[7], out[8] = _C23 * x * z, _C24 * (xx - yy)
    if degree >= 3:
        xx, yy, zz = x * x, y * y, z * z
        out[9] = _C30 * y * (3.0 * xx - yy)
        out[10] = _C31 * x * y * z
        out[11] = _C32 * y * (4.0 * zz - xx - yy)
        out[12] = _C33 * z * (2.0 * zz - 3.0 * xx - 3.0 * yy)
        out[13] = _C34 * x * (4.0 * zz - xx - yy)
        out[14] = _C35 * z * (xx - yy)
        out[15] = _C36 * x * (xx - 3.0 * yy)


@njit(parallel=True, cache=True)
def sh_forward(
    degree,
    means,  # [N, 3] float64
    campos,  # [C, 3]
    coeffs,  # [N, K, 3]
    colors,  # [C, N, 3] out: clamp_min(SH + 0.5, 0)
):
    N = means.shape[0]
    C = campos.shape[0]
    n_basis = (degree + 1) * (degree + 1)
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        basis = np.empty(16)
        for n in range(chunk * CHUNK, min(N, (chunk + 1) * CHUNK)):
            for cam in range(C):
                dx, dy, dz = means[n, 0] - campos[cam, 0], means[n, 1] - campos[cam, 1], means[n, 2] - campos[cam, 2]
                inv = 1.0 / max(math.sqrt(dx * dx + dy * dy + dz * dz), 1e-12)
                _sh_basis(degree, dx * inv, dy * inv, dz * inv, basis)
                for ch in range(3):
                    s = 0.0
                    for k in range(n_basis):
                        s += basis[k] * coeffs[n, k, ch]
                    colors[cam, n, ch] = max(s + 0.5, 0.0)


@njit(parallel=True, cache=True)
def sh_backward(
    degree,
    means,  # [N, 3] float64
    campos,  # [C, 3]
    coeffs,  # [N, K, 3]
    v_colors,  # [C, N, 3]
    v_coeffs,  # [N, K, 3] out
    v_means,  # [N, 3] out (added to)
):
    N = means.shape[0]
    C = campos.shape[0]
    n_basis = (degree + 1) * (degree + 1)
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        basis = np.empty(16)
        vc = np.empty(3)
        vb = np.zeros(16)
        for n in range(chunk * CHUNK, min(N, (chunk + 1) * CHUNK)):
            for cam in range(C):
                dx, dy, dz = means[n, 0] - campos[cam, 0], means[n, 1] - campos[cam, 1], means[n, 2] - campos[cam, 2]
                norm = math.sqrt(dx * dx + dy * dy + dz * dz)
                inv = 1.0 / max(norm, 1e-12)
                x, y, z = dx * inv, dy * inv, dz * inv
                _sh_basis(degree, x, y, z, basis)
                for ch in range(3):
                    vc[ch] = 0.0
                    s = 0.0
                    for k in range(n_basis):
                        s += basis[k] * coeffs[n, k, ch]
                    if s + 0.5 >= 0.0:  # clamp_min passes the gradient where not clamped
                        vc[ch] = v_colors[cam, n, ch]
                for k in range(n_basis):
                    for ch in range(3):
                        v_coeffs[n, k, ch] += basis[k] * vc[ch]
                if degree == 0:
                    continue
                # dL/d basis_k = coeffs_k . vc, then through the basis polynomials to (x, y, z)
                for k in range(1, n_basis):
                    vb[k] = coeffs[n, k, 0] * vc[0] + coeffs[n, k, 1] * vc[1] + coeffs[n, k, 2] * vc[2]
                gx = -_C1 * vb[3]
                gy = -_C1 * vb[1]
                gz = _C1 * vb[2]
                if degree >= 2:
                    gx += _C20 * y * vb[4] + _C22 * (-2.0 * x) * vb[6] + _C23 * z * vb[7] + _C24 * 2.0 * x * vb[8]
                    gy += _C20 * x * vb[4] + _C21 * z * vb[5] + _C22 * (-2.0 * y) * vb[6] - _C24 * 2.0 * y * vb[8]
                    gz += _C21 * y * vb[5] + _C22 * 4.0 * z * vb[6] + _C23 * x * vb[7]
                if degree >= 3:
                    xx, yy, zz = x * x, y * y, z * z
                    gx += _C30 * y * 6.0 * x * vb[9] + _C31 * y * z * vb[10] + _C32 * y * (-2.0 * x) * vb[11]
                    gx += _C33 * z * (-6.0 * x) * vb[12] + _C34 * (4.0 * zz - 3.0 * xx - yy) * vb[13]
                    gx += _C35 * z * 2.0 * x * vb[14] + _C36 * (3.0 * xx - 3.0 * yy) * vb[15]
                    gy += _C30 * (3.0 * xx - 3.0 * yy) * vb[9] + _C31 * x * z * vb[10]
                    gy += _C32 * (4.0 * zz - xx - 3.0 * yy) * vb[11] + _C33 * z * (-6.0 * y) * vb[12]
                    gy += _C34 * x * (-2.0 * y) * vb[13] + _C35 * z * (-2.0 * y) * vb[14] + _C36 * x * (-6.0 * y) * vb[15]
                    gz += _C31 * x * y * vb[10] + _C32 * y * 8.0 * z * vb[11]
                    gz += _C33 * (6.0 * zz - 3.0 * xx - 3.0 * yy) * vb[12] + _C34 * x * 8.0 * z * vb[13]
                    gz += _C35 * (xx - yy) * vb[14]
                # through the normalisation d / |d|
                dot = x * gx + y * gy + z * gz
                v_means[n, 0] += (gx - x * dot) * inv
                v_means[n, 1] += (gy - y * dot) * inv
                v_means[n, 2] += (gz - z * dot) * inv


@njit(cache=True)
def _radix_sort_pairs(keys, ids):
    """`ids` [n] int32 reordered by `keys` [n] int32 (bit patterns of float32 depths), stably: three
    11-bit counting passes, least significant first, carrying each key beside its id (no gathers).
    Non-negative floats order as their bits; negative ones (behind the camera: culled, never
    binned) sort after them."""
    n = keys.shape[0]
    k_in = (keys.astype(np.int64) & 0xFFFFFFFF)
    i_in = ids.copy()
    k_out = np.empty_like(k_in)
    i_out = np.empty_like(i_in)
    counts = np.empty(2049, dtype=np.int64)
    for shift in (0, 11, 22):
        counts[:] = 0
        for i in range(n):
            counts[((k_in[i] >> shift) & 2047) + 1] += 1
        for b in range(2048):
            counts[b + 1] += counts[b]
        for i in range(n):
            digit = (k_in[i] >> shift) & 2047
            slot = counts[digit]
            k_out[slot] = k_in[i]
            i_out[slot] = i_in[i]
            counts[digit] = slot + 1
        k_in, k_out = k_out, k_in
        i_in, i_out = i_out, i_in
    return i_in


@njit(cache=True)
def _radix_argsort(keys):  # [N] int32 bit patterns of float32 depths
    """Stable argsort [N] int32 of float32 values given as their bits (`_radix_sort_pairs`)."""
    return _radix_sort_pairs(keys, np.arange(keys.shape[0]).astype(np.int32))


@njit(parallel=True, cache=True)
def bin_tiles(
    means2d,  # [C, N, 2]
    radii,  # [C, N] int32
    depths,  # [C, N]
    tile_size,
    tile_width,
    tile_height,
):
    """gsplat's tile intersections: (tiles_per_gauss [C, N] int32, isect_ids [M] int64,
    flatten_ids [M] int32, tile_starts [C * tiles + 1] int64), sorted by camera, tile, then depth
    (stable: equal depths keep Gaussian order). Tile boxes are found in parallel; the Gaussians
    that touch a tile are depth-sorted (the culled ones are left out of the sort) and dealt to
    their tiles front to back."""
    C, N = radii.shape
    n_tiles = tile_width * tile_height
    counts = np.zeros((C, N), dtype=np.int32)
    box = np.zeros((C, N, 4), dtype=np.int64)
    for cn in prange(C * N):
        cam = cn // N
        n = cn - cam * N
        if radii[cam, n] <= 0:
            continue
        cx, cy = means2d[cam, n, 0] / tile_size, means2d[cam, n, 1] / tile_size
        r = radii[cam, n] / tile_size
        x0 = min(max(int(math.floor(cx - r)), 0), tile_width)
        y0 = min(max(int(math.floor(cy - r)), 0), tile_height)
        x1 = min(max(int(math.ceil(cx + r)), 0), tile_width)
        y1 = min(max(int(math.ceil(cy + r)), 0), tile_height)
        box[cam, n, 0], box[cam, n, 1], box[cam, n, 2], box[cam, n, 3] = x0, y0, x1, y1
        counts[cam, n] = (x1 - x0) * (y1 - y0)
    per_tile = np.zeros(C * n_tiles + 1, dtype=np.int64)
    for cam in range(C):
        for n in range(N):
            if counts[cam, n] == 0:
                continue
            for ty in range(box[cam, n, 1], box[cam, n, 3]):
                base = cam * n_tiles + ty * tile_width + 1
                for tx in range(box[cam, n, 0], box[cam, n, 2]):
                    per_tile[base + tx] += 1
    starts = np.cumsum(per_tile)  # [C * tiles + 1]
    total = starts[-1]
    flatten_ids = np.empty(total, dtype=np.int32)
    isect_ids = np.empty(total, dtype=np.int64)
    depth_bits = depths.astype(np.float32).view(np.int32)  # [C, N]
    tile_bits = 0
    while (1 << tile_bits) <= n_tiles:
        tile_bits += 1
    fill = starts[:-1].copy()
    touching = np.empty(N, dtype=np.int32)
    keys = np.empty(N, dtype=np.int32)
    for cam in range(C):
        m = 0
        for n in range(N):
            if counts[cam, n] > 0:
                touching[m] = n
                keys[m] = depth_bits[cam, n]
                m += 1
        # visiting Gaussians front to back (stable) leaves every tile's list in depth order
        for n in _radix_sort_pairs(keys[:m], touching[:m]):
            for ty in range(box[cam, n, 1], box[cam, n, 3]):
                base = cam * n_tiles + ty * tile_width
                for tx in range(box[cam, n, 0], box[cam, n, 2]):
                    flatten_ids[fill[base + tx]] = cam * N + n
                    fill[base + tx] += 1
    flat_bits = depth_bits.reshape(-1)  # [C * N]
    for t in prange(C * n_tiles):  # the ids, tile by tile (one write stream each, not one per tile at once)
        cam = t // n_tiles
        head = (np.int64(cam) << (32 + tile_bits)) | (np.int64(t - cam * n_tiles) << 32)
        for e in range(starts[t], starts[t + 1]):
            isect_ids[e] = head | (np.int64(flat_bits[flatten_ids[e]]) & 0xFFFFFFFF)
    return counts, isect_ids, flatten_ids, starts
