"""A fixed 3-D PCA projection of features, so the viewer's `feature_pca` does not flicker."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class FeaturePCA:
    """Projects D-dim features to RGB with a basis fitted once (or on demand), not per frame."""

    def __init__(self) -> None:
        self.mean: Optional[Tensor] = None  # [D]
        self.basis: Optional[Tensor] = None  # [D, 3]
        self.low: Optional[Tensor] = None  # [3]
        self.high: Optional[Tensor] = None  # [3]

    @property
    def fitted(self) -> bool:
        return self.basis is not None

    @torch.no_grad()
    def fit(self, features: Tensor, max_samples: int = 20000, seed: int = 0) -> "FeaturePCA":
        """Fits on (a deterministic sample of) features [N, D]; signs fixed for reproducibility."""
        if features.shape[0] > max_samples:
            g = torch.Generator().manual_seed(seed)
            features = features[torch.randperm(features.shape[0], generator=g)[:max_samples].to(features.device)]
        x = features.float()
        self.mean = x.mean(dim=0)
        centred = x - self.mean
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        basis = v[:3].T  # [D, k]
        if basis.shape[1] < 3:
            basis = torch.cat([basis, basis.new_zeros(basis.shape[0], 3 - basis.shape[1])], dim=1)
        largest = basis.abs().argmax(dim=0)  # SVD signs are arbitrary: make each axis' largest entry positive
        self.basis = basis * torch.where(basis[largest, torch.arange(3)] < 0, -1.0, 1.0)
        proj = centred @ self.basis
        self.low, self.high = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
        return self

    @torch.no_grad()
    def project(self, features: Tensor) -> Tensor:
        """[..., D] -> [..., 3] colours in [0, 1]."""
        if not self.fitted:
            raise RuntimeError("FeaturePCA.project called before fit")
        proj = (features.float() - self.mean.to(features.device)) @ self.basis.to(features.device)
        low, high = self.low.to(features.device), self.high.to(features.device)
        return ((proj - low) / (high - low).clamp(min=1e-6)).clamp(0.0, 1.0)
