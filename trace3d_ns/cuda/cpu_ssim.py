"""Compiled (numba) CPU kernels of the SSIM loss: pytorch_msssim's `ssim` (a separable Gaussian window,
`valid` filtering along H then W, alpha = beta = gamma = 1) forward and backward, parallel over rows.

The torch version filters five images (x, y, x^2, y^2, x y) with ten depthwise convolutions, and its
backward runs six more: on one CPU thread about a tenth of a compiled training step at 128 px. Here one
pass per output row filters all five (the inner loops run along contiguous rows, which the compiler
vectorises), and the forward also writes, per output pixel, the derivatives of the SSIM map with
respect to the filtered images, so the backward is two transposed filterings of those maps.

With a = mu_x, b = mu_y, S_xx = E[x^2] - a^2, S_yy = E[y^2] - b^2, S_xy = E[x y] - a b:

    L = (2 a b + C1) / (a^2 + b^2 + C1)   Cs = (2 S_xy + C2) / (S_xx + S_yy + C2)   s = L Cs
    ds/da = Cs dL/da + L (2 a Cs - 2 b) / B2        dL/da = 2 (b - a L) / B1   (B1, B2 the denominators)
    ds/dE[x^2] = ds/dE[y^2] = -L Cs / B2            ds/dE[x y] = 2 L / B2

(ds/db by symmetry), and dx = W^T(ds/da) + 2 x W^T(ds/dE[x^2]) + y W^T(ds/dE[x y]), W^T the transposed
(full) filtering.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_FASTMATH = {"reassoc", "contract"}
"""Sums may be reordered (the row sums vectorise); no assumption about NaN or infinity, which pass
through as in the reference."""

COEFFICIENTS = 4
"""Per-pixel derivative maps the forward writes: ds/da, ds/db, ds/dE[x^2] (= ds/dE[y^2]), ds/dE[x y]."""


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def ssim_forward(
    x,  # [B, H, W] float32
    y,  # [B, H, W] float32
    win,  # [K] float32 window (H and W >= K)
    c1,
    c2,
    coef,  # [COEFFICIENTS, B, H - K + 1, W - K + 1] float32 out
):
    """[B, H - K + 1] float64: each output row's sum of the SSIM map (the caller takes the mean)."""
    B, H, W = x.shape
    K = win.shape[0]
    Ho, Wo = H - K + 1, W - K + 1
    k1, k2 = np.float32(c1), np.float32(c2)
    rows = np.zeros((B, Ho))
    for r in prange(B * Ho):
        b = r // Ho
        i = r - b * Ho
        cols = np.zeros((5, W), dtype=np.float32)  # [x, y, x^2, y^2, x y] filtered along H
        c0, c1_, c2_, c3, c4 = cols[0], cols[1], cols[2], cols[3], cols[4]
        for k in range(K):
            wk = win[k]
            xr = x[b, i + k]
            yr = y[b, i + k]
            for j in range(W):
                xv = xr[j]
                yv = yr[j]
                c0[j] += wk * xv
                c1_[j] += wk * yv
                c2_[j] += wk * (xv * xv)
                c3[j] += wk * (yv * yv)
                c4[j] += wk * (xv * yv)
        filt = np.zeros((5, Wo), dtype=np.float32)  # and along W
        for m in range(5):
            src = cols[m]
            dst = filt[m]
            for k in range(K):
                wk = win[k]
                for j in range(Wo):
                    dst[j] += wk * src[j + k]
        total = 0.0
        two = np.float32(2.0)
        for j in range(Wo):
            a = filt[0, j]
            bb = filt[1, j]
            sxx = filt[2, j] - a * a
            syy = filt[3, j] - bb * bb
            sxy = filt[4, j] - a * bb
            inv1 = np.float32(1.0) / (a * a + bb * bb + k1)
            inv2 = np.float32(1.0) / (sxx + syy + k2)
            lum = (two * a * bb + k1) * inv1
            cs = (two * sxy + k2) * inv2
            total += lum * cs
            coef[0, b, i, j] = two * cs * (bb - a * lum) * inv1 + two * lum * (a * cs - bb) * inv2
            coef[1, b, i, j] = two * cs * (a - bb * lum) * inv1 + two * lum * (bb * cs - a) * inv2
            coef[2, b, i, j] = -lum * cs * inv2
            coef[3, b, i, j] = two * lum * inv2
        rows[b, i] = total
    return rows


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def ssim_backward(
    x,  # [B, H, W] float32: the image whose gradient is wanted
    y,  # [B, H, W] float32: the other image
    win,  # [K] float32
    coef,  # [COEFFICIENTS, B, Ho, Wo] float32 (`ssim_forward`)
    mean_slot,  # 0: gradient of x (ds/da); 1: of y (ds/db, with x and y swapped by the caller)
    scale,  # d loss / d ssim divided by the number of SSIM map pixels
    grad,  # [B, H, W] float32 out
):
    B, H, W = x.shape
    K = win.shape[0]
    Ho, Wo = coef.shape[2], coef.shape[3]
    spread = np.zeros((3, B, Ho, W), dtype=np.float32)  # the three derivative maps, transposed along W
    for r in prange(B * Ho):
        b = r // Ho
        i = r - b * Ho
        for m in range(3):
            src = coef[mean_slot if m == 0 else m + 1, b, i]
            dst = spread[m, b, i]
            for k in range(K):
                wk = win[k]
                for j in range(Wo):
                    dst[j + k] += wk * src[j]
    for r in prange(B * H):
        b = r // H
        p = r - b * H
        acc = np.zeros((3, W), dtype=np.float32)  # and along H: rows i = p - k of the output
        for k in range(K):
            i = p - k
            if i < 0 or i >= Ho:
                continue
            wk = win[k]
            for m in range(3):
                src = spread[m, b, i]
                dst = acc[m]
                for j in range(W):
                    dst[j] += wk * src[j]
        xr = x[b, p]
        yr = y[b, p]
        out = grad[b, p]
        a0, a1, a2 = acc[0], acc[1], acc[2]
        s = np.float32(scale)
        two = np.float32(2.0)
        for j in range(W):
            out[j] = s * (a0[j] + two * xr[j] * a1[j] + yr[j] * a2[j])
