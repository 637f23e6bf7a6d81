"""Instances from the lifted features: per-Gaussian ids by clustering, without Gaussian Instance
Tracing's labels (e.g. for a model whose features were lifted from raw masks).

HDBSCAN (scikit-learn) on the unit-normalised selection features (``model.selection_features()``)
of at most ``max_samples`` Gaussians drawn at random (its cost grows faster than linearly); every
Gaussian then joins the cluster whose mean direction is the most similar to its feature, when
that cosine similarity is >= ``min_similarity`` (else id 0, "none"). Ids are 1..K by cluster size,
largest first; a Gaussian's confidence is its similarity to its cluster's centroid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from torch import Tensor


@dataclass
class FeatureClusteringConfig:
    """How lifted features become instance ids."""

    max_samples: int = 20000
    """Gaussians HDBSCAN clusters (a seeded random subset); the others join the nearest cluster."""
    min_cluster_size: int = 30
    """HDBSCAN's smallest cluster, in sampled Gaussians."""
    min_similarity: float = 0.7
    """Cosine similarity to a cluster's centroid a Gaussian needs to join it (the selection threshold)."""
    seed: int = 0


def cluster_features(features: Tensor, config: FeatureClusteringConfig = FeatureClusteringConfig()) -> Tuple[Tensor, Tensor]:
    """features [N, D] -> (labels [N] int64, 0 = none; confidence [N] float32)."""
    from sklearn.cluster import HDBSCAN  # lazy: scikit-learn is heavy

    n = features.shape[0]
    unit = torch.nn.functional.normalize(features.detach().float(), dim=-1)  # [N, D]
    generator = torch.Generator().manual_seed(config.seed)
    sample = torch.randperm(n, generator=generator)[: config.max_samples].to(unit.device)  # [S]
    points = unit[sample].cpu().numpy()
    found = np.full(len(points), -1)
    if len(points) >= max(2, config.min_cluster_size):  # fewer points than one cluster: none (HDBSCAN would raise)
        found = HDBSCAN(min_cluster_size=config.min_cluster_size).fit_predict(points)
        if not (found >= 0).any():
            # HDBSCAN never returns the root as a cluster by default, so features that form one cluster
            # (a scene that is one object, e.g. the Blender LEGO) came back as all noise: allow it.
            found = HDBSCAN(min_cluster_size=config.min_cluster_size, allow_single_cluster=True).fit_predict(points)
    ids, sizes = np.unique(found[found >= 0], return_counts=True)
    if len(ids) == 0:
        return torch.zeros(n, dtype=torch.long, device=unit.device), torch.zeros(n, device=unit.device)
    ids = ids[np.argsort(-sizes, kind="stable")]  # largest first
    member = torch.from_numpy(found[:, None] == ids[None, :]).to(unit.device).float()  # [S, K]
    centroids = torch.nn.functional.normalize(member.T @ unit[sample], dim=-1)  # [K, D]
    similarity, nearest = (unit @ centroids.T).max(dim=1)  # [N]
    labels = torch.where(similarity >= config.min_similarity, nearest + 1, torch.zeros_like(nearest))
    return labels.long(), similarity.clamp(min=0.0).float()
