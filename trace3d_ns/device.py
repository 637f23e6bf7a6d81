"""Device checks with messages that say what to do."""

from __future__ import annotations

from typing import Union

import torch


class DeviceUnavailableError(RuntimeError):
    """The requested torch device does not exist on this machine."""


def require_device(device: Union[str, torch.device]) -> torch.device:
    """Returns `device` as a torch.device, or raises a clear error when CUDA is asked for without one."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "CUDA was requested, but this machine has no usable CUDA GPU (torch.cuda.is_available() is False). "
            "trace3d runs on the CPU too, through its own torch rasterizer: add "
            "`--machine.device-type cpu` to the ns-train command."
        )
    return device
