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


@njit(cache=True, inline="always")
def _to_camera(V, means, n, S, Sc):
    """Camera-space mean (tx, ty, tz) of Gaussian n, and its camera covariance R S R^T written to
    Sc [3, 3] (S the world covariance as (xx, xy, xz, yy, yz, zz)), written out in scalars."""
    m0, m1, m2 = means[n, 0], means[n, 1], means[n, 2]
    v00, v01, v02 = V[0, 0], V[0, 1], V[0, 2]
    v10, v11, v12 = V[1, 0], V[1, 1], V[1, 2]
    v20, v21, v22 = V[2, 0], V[2, 1], V[2, 2]
    tx = v00 * m0 + v01 * m1 + v02 * m2 + V[0, 3]
    ty = v10 * m0 + v11 * m1 + v12 * m2 + V[1, 3]
    tz = v20 * m0 + v21 * m1 + v22 * m2 + V[2, 3]
    sxx, sxy, sxz, syy, syz, szz = S
    a00 = v00 * sxx + v01 * sxy + v02 * sxz  # (R S)[i, j]
    a01 = v00 * sxy + v01 * syy + v02 * syz
    a02 = v00 * sxz + v01 * syz + v02 * szz
    a10 = v10 * sxx + v11 * sxy + v12 * sxz
    a11 = v10 * sxy + v11 * syy + v12 * syz
    a12 = v10 * sxz + v11 * syz + v12 * szz
    a20 = v20 * sxx + v21 * sxy + v22 * sxz
    a21 = v20 * sxy + v21 * syy + v22 * syz
    a22 = v20 * sxz + v21 * syz + v22 * szz
    Sc[0, 0] = a00 * v00 + a01 * v01 + a02 * v02  # (R S R^T)[i, j]
    Sc[0, 1] = a00 * v10 + a01 * v11 + a02 * v12
    Sc[0, 2] = a00 * v20 + a01 * v21 + a02 * v22
    Sc[1, 0] = a10 * v00 + a11 * v01 + a12 * v02
    Sc[1, 1] = a10 * v10 + a11 * v11 + a12 * v12
    Sc[1, 2] = a10 * v20 + a11 * v21 + a12 * v22
    Sc[2, 0] = a20 * v00 + a21 * v01 + a22 * v02
    Sc[2, 1] = a20 * v10 + a21 * v11 + a22 * v12
    Sc[2, 2] = a20 * v20 + a21 * v21 + a22 * v22
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


@njit(cache=True)
def _clamp_bounds(Ks, width, height):
    """[C, 4]: (lo_x, hi_x, lo_y, hi_y), the range of x / z and y / z the projection's Jacobian is
    evaluated in (gsplat: the image widened by 30% of its half-size on each side)."""
    C = Ks.shape[0]
    out = np.empty((C, 4))
    for cam in range(C):
        fx, fy, cx, cy = Ks[cam, 0, 0], Ks[cam, 1, 1], Ks[cam, 0, 2], Ks[cam, 1, 2]
        margin_x, margin_y = 0.3 * 0.5 * width / fx, 0.3 * 0.5 * height / fy
        out[cam, 0], out[cam, 1] = -(cx / fx + margin_x), (width - cx) / fx + margin_x
        out[cam, 2], out[cam, 3] = -(cy / fy + margin_y), (height - cy) / fy + margin_y
    return out


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
    bounds = _clamp_bounds(Ks, width, height)
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        Sc = np.empty((3, 3))
        for n in range(chunk * CHUNK, min(N, (chunk + 1) * CHUNK)):
            _, _, _, _, _, Rq = _rotation(quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3])
            S, _ = _covariance(Rq, scales[n, 0], scales[n, 1], scales[n, 2])
            for cam in range(C):
                V = viewmats[cam]
                fx, fy, cx, cy = Ks[cam, 0, 0], Ks[cam, 1, 1], Ks[cam, 0, 2], Ks[cam, 1, 2]
                tx, ty, tz = _to_camera(V, means, n, S, Sc)
                itz = 1.0 / tz  # one division per Gaussian and camera, then products
                rx, ry = tx * itz, ty * itz
                mx = fx * rx + cx
                my = fy * ry + cy
                u = min(max(rx, bounds[cam, 0]), bounds[cam, 1])
                v = min(max(ry, bounds[cam, 2]), bounds[cam, 3])
                j00, j02, j11, j12 = fx * itz, -fx * u * itz, fy * itz, -fy * v * itz
                a0, b, c0 = _cov2d(Sc, j00, j02, j11, j12)
                det_orig = a0 * c0 - b * b
                a, c = a0 + eps2d, c0 + eps2d
                det_blur = a * c - b * b
                det = max(det_blur, 1e-10)
                idet = 1.0 / det
                conics[cam, n, 0] = c * idet
                conics[cam, n, 1] = -b * idet
                conics[cam, n, 2] = a * idet
                compensations[cam, n] = math.sqrt(max(det_orig * idet, 0.0))
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
    bounds = _clamp_bounds(Ks, width, height)
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        Sc = np.empty((3, 3))
        vR = np.empty(9)
        for n in range(chunk * CHUNK, min(N, (chunk + 1) * CHUNK)):
            w, x, y, z, qnorm, Rq = _rotation(quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3])
            s0, s1, s2 = scales[n, 0], scales[n, 1], scales[n, 2]
            S, M = _covariance(Rq, s0, s1, s2)
            s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = 0.0  # dL / d world covariance
            vm0 = 0.0
            vm1 = 0.0
            vm2 = 0.0
            seen = False
            for cam in range(C):
                if radii[cam, n] <= 0:
                    continue
                seen = True
                V = viewmats[cam]
                fx, fy = Ks[cam, 0, 0], Ks[cam, 1, 1]
                tx, ty, tz = _to_camera(V, means, n, S, Sc)
                lo_x, hi_x, lo_y, hi_y = bounds[cam, 0], bounds[cam, 1], bounds[cam, 2], bounds[cam, 3]
                itz = 1.0 / tz
                itz2 = itz * itz
                rx, ry = tx * itz, ty * itz
                u = min(max(rx, lo_x), hi_x)
                v = min(max(ry, lo_y), hi_y)
                j00, j02, j11, j12 = fx * itz, -fx * u * itz, fy * itz, -fy * v * itz
                a0, b, c0 = _cov2d(Sc, j00, j02, j11, j12)
                det_orig = a0 * c0 - b * b
                a, c = a0 + eps2d, c0 + eps2d
                det_blur = a * c - b * b
                clamped = not (det_blur > 1e-10)
                det = 1e-10 if clamped else det_blur
                g0, g1, g2 = v_conics[cam, n, 0], v_conics[cam, n, 1], v_conics[cam, n, 2]
                inv = 1.0 / det
                inv2 = inv * inv
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
                e00, e01, e02 = j00 * p00, j00 * p01, j00 * p02  # v_Sc
                e10, e11, e12 = j11 * p10, j11 * p11, j11 * p12
                e20, e21, e22 = j02 * p00 + j12 * p10, j02 * p01 + j12 * p11, j02 * p02 + j12 * p12
                vJ00 = 2.0 * (p00 * Sc[0, 0] + p01 * Sc[1, 0] + p02 * Sc[2, 0])
                vJ02 = 2.0 * (p00 * Sc[0, 2] + p01 * Sc[1, 2] + p02 * Sc[2, 2])
                vJ11 = 2.0 * (p10 * Sc[0, 1] + p11 * Sc[1, 1] + p12 * Sc[2, 1])
                vJ12 = 2.0 * (p10 * Sc[0, 2] + p11 * Sc[1, 2] + p12 * Sc[2, 2])
                # Sc = V S V^T: v_S += V^T v_Sc V, as V^T (v_Sc V), in scalars
                v00, v01, v02 = V[0, 0], V[0, 1], V[0, 2]
                v10, v11, v12 = V[1, 0], V[1, 1], V[1, 2]
                v20, v21, v22 = V[2, 0], V[2, 1], V[2, 2]
                w00 = e00 * v00 + e01 * v10 + e02 * v20
                w01 = e00 * v01 + e01 * v11 + e02 * v21
                w02 = e00 * v02 + e01 * v12 + e02 * v22
                w10 = e10 * v00 + e11 * v10 + e12 * v20
                w11 = e10 * v01 + e11 * v11 + e12 * v21
                w12 = e10 * v02 + e11 * v12 + e12 * v22
                w20 = e20 * v00 + e21 * v10 + e22 * v20
                w21 = e20 * v01 + e21 * v11 + e22 * v21
                w22 = e20 * v02 + e21 * v12 + e22 * v22
                s00 += v00 * w00 + v10 * w10 + v20 * w20
                s01 += v00 * w01 + v10 * w11 + v20 * w21
                s02 += v00 * w02 + v10 * w12 + v20 * w22
                s10 += v01 * w00 + v11 * w10 + v21 * w20
                s11 += v01 * w01 + v11 * w11 + v21 * w21
                s12 += v01 * w02 + v11 * w12 + v21 * w22
                s20 += v02 * w00 + v12 * w10 + v22 * w20
                s21 += v02 * w01 + v12 * w11 + v22 * w21
                s22 += v02 * w02 + v12 * w12 + v22 * w22
                # J(tz, u, v), u = clamp(tx / tz), v = clamp(ty / tz)
                vtx = v_means2d[cam, n, 0] * fx * itz
                vty = v_means2d[cam, n, 1] * fy * itz
                vtz = -(v_means2d[cam, n, 0] * fx * tx + v_means2d[cam, n, 1] * fy * ty) * itz2 + v_depths[cam, n]
                vtz += (-vJ00 * fx - vJ11 * fy + vJ02 * fx * u + vJ12 * fy * v) * itz2
                vu = -vJ02 * fx * itz
                vv = -vJ12 * fy * itz
                if rx >= lo_x and rx <= hi_x:
                    vtx += vu * itz
                    vtz -= vu * tx * itz2
                if ry >= lo_y and ry <= hi_y:
                    vty += vv * itz
                    vtz -= vv * ty * itz2
                vm0 += V[0, 0] * vtx + V[1, 0] * vty + V[2, 0] * vtz
                vm1 += V[0, 1] * vtx + V[1, 1] * vty + V[2, 1] * vtz
                vm2 += V[0, 2] * vtx + V[1, 2] * vty + V[2, 2] * vtz
            v_means[n, 0], v_means[n, 1], v_means[n, 2] = vm0, vm1, vm2
            if not seen:
                v_quats[n, :] = 0.0
                v_scales[n, :] = 0.0
                continue
            # S = M M^T: v_M = (vS + vS^T) M, written out (M and Rq are tuples: no runtime indexing)
            q00, q11, q22 = s00 + s00, s11 + s11, s22 + s22
            q01, q02, q12 = s01 + s10, s02 + s20, s12 + s21
            m0, m1, m2, m3, m4, m5, m6, m7, m8 = M
            g00 = q00 * m0 + q01 * m3 + q02 * m6
            g01 = q00 * m1 + q01 * m4 + q02 * m7
            g02 = q00 * m2 + q01 * m5 + q02 * m8
            g10 = q01 * m0 + q11 * m3 + q12 * m6
            g11 = q01 * m1 + q11 * m4 + q12 * m7
            g12 = q01 * m2 + q11 * m5 + q12 * m8
            g20 = q02 * m0 + q12 * m3 + q22 * m6
            g21 = q02 * m1 + q12 * m4 + q22 * m7
            g22 = q02 * m2 + q12 * m5 + q22 * m8
            # M = Rq diag(s)
            r0, r1, r2, r3, r4, r5, r6, r7, r8 = Rq
            v_scales[n, 0] = g00 * r0 + g10 * r3 + g20 * r6
            v_scales[n, 1] = g01 * r1 + g11 * r4 + g21 * r7
            v_scales[n, 2] = g02 * r2 + g12 * r5 + g22 * r8
            vR[0], vR[1], vR[2] = g00 * s0, g01 * s1, g02 * s2
            vR[3], vR[4], vR[5] = g10 * s0, g11 * s1, g12 * s2
            vR[6], vR[7], vR[8] = g20 * s0, g21 * s1, g22 * s2
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
