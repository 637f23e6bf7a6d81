"""SSIM as splatfacto's loss computes it (`pytorch_msssim.SSIM(data_range, size_average=True)`), with
the compiled CPU kernels of `cpu_ssim` where they apply and pytorch_msssim itself, the reference,
everywhere else (other devices, 3-D images, images smaller than the window, float64)."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor


def _kernels():
    from trace3d_ns.cuda import compiled

    compiled.load()  # numba present and able to cache, as for the rasterizer
    from trace3d_ns.cuda import cpu_ssim

    return cpu_ssim


def _planes(t: Tensor) -> np.ndarray:
    """[N, C, H, W] -> [N * C, H, W] float32 C-contiguous array (a view when it can be)."""
    n, c, h, w = t.shape
    return np.ascontiguousarray(t.detach().reshape(n * c, h, w).numpy(), dtype=np.float32)


class _CompiledSSIM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X: Tensor, Y: Tensor, win: np.ndarray, constants: Tuple[float, float]) -> Tensor:
        from trace3d_ns.cuda.compiled import _LOCK

        kernels = _kernels()
        x, y = _planes(X), _planes(Y)
        K = win.shape[0]
        B, H, W = x.shape
        coef = np.empty((kernels.COEFFICIENTS, B, H - K + 1, W - K + 1), np.float32)
        with _LOCK:
            rows = kernels.ssim_forward(x, y, win, constants[0], constants[1], coef)  # [B, Ho]
        ctx.saved = (x, y, win, coef, X.shape)
        return torch.tensor(rows.sum() / coef[0].size, dtype=X.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        from trace3d_ns.cuda.compiled import _LOCK

        kernels = _kernels()
        x, y, win, coef, shape = ctx.saved
        scale = float(grad_out) / coef[0].size
        grads = []
        for slot, (first, second), wanted in ((0, (x, y), ctx.needs_input_grad[0]), (1, (y, x), ctx.needs_input_grad[1])):
            if not wanted:
                grads.append(None)
                continue
            g = np.empty_like(first)
            with _LOCK:
                kernels.ssim_backward(first, second, win, coef, slot, scale, g)
            grads.append(torch.from_numpy(g).reshape(shape))
        ctx.saved = None
        return grads[0], grads[1], None, None


class SSIM(torch.nn.Module):
    """Drop-in for `pytorch_msssim.SSIM(data_range, size_average=True, win_size, win_sigma, channel, K)`
    (2-D images, the default non-negative-free SSIM): mean SSIM of X and Y [N, C, H, W], through the
    compiled kernels for float32 CPU images at least a window wide and high, through pytorch_msssim
    otherwise. Equal to pytorch_msssim up to float32 rounding, gradients included (tests)."""

    def __init__(
        self, data_range: float = 1.0, win_size: int = 11, win_sigma: float = 1.5, channel: int = 3,
        K: Tuple[float, float] = (0.01, 0.03),
    ) -> None:
        super().__init__()
        from pytorch_msssim import SSIM as ReferenceSSIM
        from pytorch_msssim.ssim import _fspecial_gauss_1d

        if win_size % 2 != 1:
            raise ValueError(f"win_size must be odd, got {win_size}")
        self.reference = ReferenceSSIM(
            data_range=data_range, size_average=True, win_size=win_size, win_sigma=win_sigma, channel=channel, K=K
        )
        self.win = _fspecial_gauss_1d(win_size, win_sigma).reshape(-1).numpy().astype(np.float32)  # [K]
        self.constants = ((K[0] * data_range) ** 2, (K[1] * data_range) ** 2)

    def compiled_applies(self, X: Tensor, Y: Tensor) -> bool:
        """Whether `forward` takes the compiled kernels for these images."""
        k = self.win.shape[0]
        return (
            X.device.type == "cpu" and Y.device.type == "cpu" and X.dim() == 4 and X.shape == Y.shape
            and X.dtype == torch.float32 and Y.dtype == torch.float32 and X.shape[-2] >= k and X.shape[-1] >= k
            and X.shape[0] * X.shape[1] > 0
        )

    def forward(self, X: Tensor, Y: Tensor) -> Tensor:
        if not self.compiled_applies(X, Y):
            return self.reference(X, Y)
        return _CompiledSSIM.apply(X, Y, self.win, self.constants)
