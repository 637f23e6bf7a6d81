"""Device checks with messages that say what to do."""

from __future__ import annotations

import warnings
from typing import Union

import torch


class DeviceUnavailableError(RuntimeError):
    """The requested torch device does not exist on this machine."""


class GsplatUnavailableError(RuntimeError):
    """A CUDA run needs gsplat's CUDA kernels, and they cannot be loaded or built."""


class DeviceFallbackWarning(UserWarning):
    """No device was asked for and there is no CUDA GPU: trace3d runs on the CPU."""


CPU_HINT = "`--machine.device-type cpu` to the ns-train command"


def require_device(device: Union[str, torch.device]) -> torch.device:
    """Returns `device` as a torch.device, or raises a clear error when CUDA is asked for without one."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "CUDA was requested, but this machine has no usable CUDA GPU (torch.cuda.is_available() is False). "
            f"trace3d runs on the CPU too, through its own torch rasterizer: add {CPU_HINT}."
        )
    return device


def resolve_device_type(device_type: str) -> str:
    """`auto` -> `cuda` when torch sees a CUDA GPU, else `cpu` with one `DeviceFallbackWarning`;
    any other device type is returned as asked (an explicit `cuda` without a GPU then fails later
    with `DeviceUnavailableError`)."""
    if device_type != "auto":
        return device_type
    if torch.cuda.is_available():
        return "cuda"
    warnings.warn(
        "No CUDA GPU found (torch.cuda.is_available() is False): trace3d trains on the CPU with its compiled "
        "rasterizer (numba; --pipeline.model.rasterizer), much slower than gsplat on a GPU. "
        f"Add {CPU_HINT} to choose this explicitly.",
        DeviceFallbackWarning,
        stacklevel=2,
    )
    return "cpu"


def require_gsplat_cuda() -> None:
    """Raises `GsplatUnavailableError` unless gsplat's CUDA extension is loaded.

    gsplat 1.4.0 from PyPI ships no compiled kernels: the first use of `gsplat.cuda` compiles them
    with nvcc (minutes, cached in torch's extension folder). Without a CUDA toolkit gsplat only
    prints a notice and leaves its extension `None`, and the first render then fails with a bare
    `AttributeError`. This triggers that import (and build) now and says what to do.
    """
    try:
        from gsplat.cuda import _backend
    except Exception as err:  # the JIT build itself failed (compiler, toolkit / torch CUDA mismatch, ...)
        raise GsplatUnavailableError(
            f"gsplat could not build its CUDA kernels ({type(err).__name__}: {err}). Check that nvcc matches "
            f"torch's CUDA {torch.version.cuda} (`nvcc --version`), or train on the CPU: add {CPU_HINT}."
        ) from err
    if getattr(_backend, "_C", None) is None:
        raise GsplatUnavailableError(
            "gsplat's CUDA kernels are not available: gsplat compiles them with nvcc on first use, and no CUDA "
            f"toolkit was found (`nvcc` is not on PATH). Install the CUDA toolkit matching torch's CUDA "
            f"{torch.version.cuda} and put its bin/ on PATH (or set CUDA_HOME), or run on the CPU: add {CPU_HINT} "
            "(ns-viewer and ns-export: run them with CUDA_VISIBLE_DEVICES= to use the CPU)."
        )


_LIBC_TRIM = None
_HEAP_KEPT = False

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_host_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let the C heap keep and reuse freed blocks of up to `limit_bytes` (glibc ``mallopt``: mmap and
    trim thresholds); False where there is no glibc. A CPU training step allocates and frees the
    same arrays every step (projections, per-tile gradients, Adam's temporaries, several MB each);
    by default glibc maps blocks over 32 MB and heap tops over its trim threshold straight back to
    the OS, so every step pays page faults and zeroing for fresh pages again. Measured on
    ``trace3d-bench step``'s scene (40k Gaussians, 128 px, compiled backend, one thread): 820 minor
    page faults a step before, 15 after; steps interleaved in one process 0.106 -> 0.092 s (RGB)
    and 0.139 -> 0.127 s (features). Memory freed this way stays in the process until
    `release_freed_host_memory`, which per-view tracing calls between views."""
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return True
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _HEAP_KEPT = bool(mallopt(_M_MMAP_THRESHOLD, int(limit_bytes))) and bool(mallopt(_M_TRIM_THRESHOLD, int(limit_bytes)))
    return _HEAP_KEPT


def release_freed_host_memory() -> bool:
    """Hand the C heap's freed pages back to the OS (glibc ``malloc_trim``); False where there is no
    glibc. ``trace_model`` calls it between views on the CPU: glibc raises its mmap threshold after
    freeing a large block, so later per-view arrays of that size come from the heap, and freed ones
    stay in the process. Measured tracing 1M Gaussians over 40 views at 256 px (``trace3d-bench
    scale``'s scene): what the loop added to the resident set was 3.5x the store without it, 0.5x
    with it (the trims also returned memory freed before the loop)."""
    global _LIBC_TRIM
    if _LIBC_TRIM is None:
        try:
            import ctypes

            _LIBC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC_TRIM = False
    if _LIBC_TRIM is False:
        return False
    _LIBC_TRIM(0)
    return True
