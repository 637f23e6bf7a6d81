"""Gaussians that other surfaces partly hide in the views that see them.

For Gaussian ``i`` and a training view ``v`` where it is seen (traced weight ``w_i^v >=
min_weight``) and its footprint lies inside the image, its **visible share** is

    s_i^v = w_i^v / m_i^v,

``m_i^v`` being what it would draw there with nothing in front of it (its footprint mass,
:func:`trace3d_ns.rendering.footprint_masses`). It is partly hidden in ``v`` when ``s_i^v <
visible_share``, and **hidden** when that holds in more than ``threshold`` of those views:

    Hs_i = |{v : s_i^v < visible_share}| / |{v : seen and in frame}|.

Why it matters for extraction: a Gaussian on an object's side whose tails reach below the floor
(or into the object it rests on) is hidden there from every training camera, so no image constrains
those tails; rendered alone, the extracted object shows them as a fringe along its contacts. Such a
Gaussian is partly hidden in every view. Splitting it (density control's ``split_hidden``) gives
two smaller children; a child wholly under the support is seen by no view and pruned as unseen,
one that still straddles it is split again in the next cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import Tensor

from trace3d_ns.git.tracing import InstanceTraces

ViewMasses = Callable[[int], Tuple[Tensor, Tensor]]
"""View index -> (footprint mass [N] float32, in frame [N] bool) at the traces' resolution."""


@dataclass
class HiddenConfig:
    """Thresholds of the hidden score."""

    visible_share: float = 0.6
    """A view partly hides a Gaussian when it draws less than this share of its footprint mass there."""
    threshold: float = 0.5
    """Hidden when the share of partly hiding views exceeds this."""
    min_weight: float = 0.5
    """A Gaussian counts in a view when its traced weight there is >= this (alpha * T units)."""


@torch.no_grad()
def hidden_scores(traces: InstanceTraces, view_masses: ViewMasses, config: HiddenConfig | None = None) -> Tuple[Tensor, Tensor]:
    """(Hs [N] float32, views counted for each Gaussian [N] int64), one view's masses at a time."""
    config = config or HiddenConfig()
    if not 0.0 < config.visible_share <= 1.0:
        raise ValueError(f"HiddenConfig.visible_share must be in (0, 1], got {config.visible_share}")
    weight = traces.obs_weight.float()  # [O]
    counted = torch.zeros(traces.num_gaussians, dtype=torch.long, device=traces.device)
    hidden = torch.zeros_like(counted)
    for v in range(traces.num_views):
        mass, in_frame = view_masses(v)  # [N], [N]
        if mass.shape[0] != traces.num_gaussians:
            raise ValueError(f"view {v}: masses of {mass.shape[0]} Gaussians for traces of {traces.num_gaussians}")
        obs, g = traces.view_observations(v)  # [o], [o]
        ok = (weight[obs] >= config.min_weight) & in_frame[g] & (mass[g] > 0)  # [o]
        g, share = g[ok], weight[obs[ok]] / mass[g[ok]]  # [o'], [o']
        counted.index_add_(0, g, torch.ones_like(g))
        hidden.index_add_(0, g, (share < config.visible_share).long())
    return hidden.float() / counted.clamp(min=1).float(), counted


def model_view_masses(model, cameras, sizes) -> ViewMasses:
    """:data:`ViewMasses` of a model's current Gaussians in its training views, each at ``sizes[v]``
    = (H, W), the resolution its traces were made at (its patch map's), with the camera
    :func:`~trace3d_ns.git.tracing.view_contributions` renders them with."""
    from trace3d_ns.git.tracing import _view_camera
    from trace3d_ns.rendering import footprint_masses

    g = model.activated_gaussians()

    def masses(v: int) -> Tuple[Tensor, Tensor]:
        size = tuple(sizes[v])
        viewmat, K = _view_camera(model, cameras, v, size)
        return footprint_masses(
            g["means"], g["quats"], g["scales"], g["opacities"], viewmat, K, size[1], size[0],
            rasterize_mode=model.config.rasterize_mode, backend=model.config.rasterizer,
        )

    return masses
