"""Image metrics that never download anything."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch


def local_alexnet_checkpoint() -> Optional[Path]:
    """The torchvision AlexNet checkpoint that LPIPS needs, if it is already in the torch hub cache."""
    from torchvision.models import AlexNet_Weights

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(AlexNet_Weights.DEFAULT.url)
    return path if path.is_file() else None


def offline_lpips() -> Optional[torch.nn.Module]:
    """torchmetrics LPIPS (AlexNet) when its weights are on disk; otherwise None and one warning."""
    if local_alexnet_checkpoint() is None:
        warnings.warn(
            "LPIPS is skipped: its AlexNet weights are not in the torch hub cache "
            f"({Path(torch.hub.get_dir()) / 'checkpoints'}) and trace3d never downloads them. "
            "Place alexnet-owt-7be5be79.pth there to enable LPIPS in evaluation.",
            stacklevel=2,
        )
        return None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(normalize=True)
