"""GIT-guided density control (Trace3D, key design 3): split the Gaussians that straddle instances,
then prune the ones that splitting did not resolve.

Functional ops, in the style of ``gsplat/strategy/ops.py`` (parameters and Adam moments updated
together through gsplat's ``_update_param_with_optimizer``; every ``state`` tensor whose first
dimension is N carried along; each op returns the source row of every Gaussian it leaves, so
callers can ``index_select`` their own per-Gaussian data):

- :func:`split_gaussians`: each selected Gaussian becomes 2 children with log scales lowered by
  ``log(scale_factor)`` (halved scales by default) and means drawn from the parent's 3D Gaussian
  ``N(mean, R S S^T R^T)``; everything else is copied. Parents are removed, children appended at
  the end (as gsplat's ``split``); their Adam moments are zero, state rows are the parent's.
- :func:`prune_gaussians`: removes the masked Gaussians.

Policy (:class:`GitDensityControl`, state in :class:`DensityControlState`). Cycle ``k`` runs at
``start_step + k * every`` for ``k < cycles``:

1. **Trace**: the pipeline's ``run_instance_tracing`` traces every training view with the current
   Gaussians, re-merges the consistent instance maps, relabels the Gaussians and installs the maps
   as training labels. So the labels and maps are refreshed once per cycle, from Gaussians that
   trained ``every`` steps since the previous cycle's edits.
2. **Ambiguity** (``trace3d_ns.git.ambiguity``) of those traces over the *consistent* instance ids
   (patches mapped through the merge): a Gaussian on the border of two patches that merging found
   to be one instance is not ambiguous; one that straddles two instances (or an instance and the
   area no mask covers) in more than ``theta_as`` of the views seeing it is.
3. **Prune** the children split in the previous cycle that are *still* ambiguous: splitting gave
   them ``every`` steps to settle into one instance and they did not. Only those: an ambiguous
   Gaussian that was not split yet gets its split first (the paper's point: splitting rather than
   deleting avoids holes). With ``prune_unseen`` (the default, as in the authors' release) also the
   Gaussians no training view sees with weight >= ``unseen_weight``.
4. **Split** the remaining ambiguous Gaussians, except in the last cycle, which only prunes: the
   final model keeps no children that were never checked. With ``split_hidden`` (off by default)
   also the hidden ones (``trace3d_ns.git.visibility``: partly hidden by other surfaces in most
   views that see them, e.g. tails under the surface an object rests on); a hidden child is not
   pruned for being hidden, only when no view sees it.

After each cycle the model's per-Gaussian buffers (``instance_labels``, ``instance_confidence``)
and ``density_children`` (the new children, kept in checkpoints for the next cycle)
and ``instance_traces`` are indexed like the Gaussians (children inherit their parent's rows
until the next cycle re-traces) and so is the strategy state (``grad2d``, ``count``, ``radii``).

Interplay with splatfacto's own densification: cycles may only start at or after the model's
``stop_split_at``, where gsplat's ``DefaultStrategy`` stops growing, pruning and resetting
opacities (:meth:`GitDensityControl.schedule` raises otherwise). From then on the number of
Gaussians changes only in the cycles, so "split in the previous cycle" is a plain [N] mask, and
no gradient-driven split or opacity reset interferes with the re-assignment the cycles wait for.
This matches the authors' release, which runs density control in an RGB fine-tune after training.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from gsplat.strategy.ops import _update_param_with_optimizer
from gsplat.utils import normalized_quat_to_rotmat
from torch import Tensor

from trace3d_ns.git.ambiguity import AmbiguityConfig, ambiguity_scores, views_seeing

Params = Dict[str, torch.nn.Parameter]


# ---- functional ops -----------------------------------------------------------------------------
def _carry_state(state: Dict[str, object], num_gaussians: int, index: Tensor) -> None:
    """Row ``i`` of every state tensor with first dimension N becomes its row ``index[i]``."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == num_gaussians:
            state[key] = value[index.to(value.device)]


@torch.no_grad()
def split_gaussians(
    params: Params,
    optimizers: Dict[str, torch.optim.Optimizer],
    state: Dict[str, object],
    mask: Tensor,
    generator: Optional[torch.Generator] = None,
    scale_factor: float = 2.0,
) -> Tensor:
    """Split every Gaussian of ``mask`` [N] bool into 2 children, in place.

    Children: means sampled from the parent's N(mean, R S S^T R^T) (activated scales, normalised
    quats), scales divided by ``scale_factor``, every other parameter copied. The N - n unselected
    Gaussians keep their order and come first, then the n first children, then the n second ones.
    Adam moments of the children are zero; state tensors with first dimension N give the children
    their parent's rows.

    Returns the source row of every Gaussian after the split. [N + n] int64
    """
    num = params["means"].shape[0]
    device = params["means"].device
    sel = torch.where(mask)[0]  # [n]
    rest = torch.where(~mask)[0]  # [N - n]
    scales = torch.exp(params["scales"][sel])  # [n, 3]
    rotmats = normalized_quat_to_rotmat(F.normalize(params["quats"][sel], dim=-1))  # [n, 3, 3]
    noise_device = generator.device if generator is not None else device
    noise = torch.randn(2, len(sel), 3, generator=generator, device=noise_device).to(device)  # [2, n, 3]
    offsets = torch.einsum("nij,nj,bnj->bni", rotmats, scales, noise)  # [2, n, 3] ~ N(0, R S S^T R^T)

    def param_fn(name: str, p: Tensor) -> torch.nn.Parameter:
        if name == "means":
            children = (p[sel] + offsets).reshape(-1, 3)  # [2n, 3]
        elif name == "scales":
            children = (p[sel] - math.log(scale_factor)).repeat(2, 1)  # [2n, 3]
        else:
            children = p[sel].repeat(2, *[1] * (p.dim() - 1))  # [2n, ...]
        return torch.nn.Parameter(torch.cat([p[rest], children]))

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        return torch.cat([v[rest], v.new_zeros((2 * len(sel), *v.shape[1:]))])

    _update_param_with_optimizer(param_fn, optimizer_fn, params, optimizers)
    index = torch.cat([rest, sel, sel])  # [N + n]
    _carry_state(state, num, index)
    return index


@torch.no_grad()
def prune_gaussians(
    params: Params, optimizers: Dict[str, torch.optim.Optimizer], state: Dict[str, object], mask: Tensor
) -> Tensor:
    """Remove every Gaussian of ``mask`` [N] bool, in place (parameters, Adam moments, state rows).

    Returns the kept rows, in order. [N - removed] int64
    """
    num = params["means"].shape[0]
    keep = torch.where(~mask)[0]

    def param_fn(name: str, p: Tensor) -> torch.nn.Parameter:
        return torch.nn.Parameter(p[keep])

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        return v[keep]

    _update_param_with_optimizer(param_fn, optimizer_fn, params, optimizers)
    _carry_state(state, num, keep)
    return keep


def plan_cycle(
    ambiguous: Tensor, num_seen: Tensor, split_last: Optional[Tensor], last: bool, prune_unseen: bool,
    hidden: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Which Gaussians a cycle prunes and which it splits (both [N] bool, disjoint).

    Args:
        ambiguous: [N] bool, As > theta_as now.
        num_seen: [N] int, training views that see each Gaussian (``unseen_weight``).
        split_last: [N] bool, children made by the previous cycle (None in the first cycle).
        last: the last cycle, which only prunes.
        prune_unseen: also prune the Gaussians no view sees.
        hidden: [N] bool, also split these (``split_hidden``); a hidden child is not pruned for it.
    """
    prune = ambiguous & split_last if split_last is not None else torch.zeros_like(ambiguous)
    if prune_unseen:
        prune = prune | (num_seen == 0)
    candidates = ambiguous if hidden is None else ambiguous | hidden
    split = candidates & ~prune if not last else torch.zeros_like(ambiguous)
    return prune, split


# ---- policy -------------------------------------------------------------------------------------
@dataclass
class CycleStats:
    """What one cycle did."""

    step: int
    cycle: int
    num_before: int
    """Gaussians when the cycle started."""
    num_seen: int
    """Gaussians seen by at least one training view."""
    num_ambiguous: int
    """Ambiguous Gaussians (As > theta_as) when the cycle started."""
    num_children: int
    """Children made by the previous cycle."""
    num_ambiguous_children: int
    """Of those, the ones still ambiguous."""
    num_pruned: int
    num_pruned_unseen: int
    """Of the pruned ones, those no view sees (only with prune_unseen)."""
    num_split: int
    num_after: int
    num_hidden: int = 0
    """Hidden Gaussians (Hs > hidden_theta, only with split_hidden) when the cycle started."""

    @property
    def ambiguous_fraction(self) -> float:
        """Share of the Gaussians seen by some view that are ambiguous."""
        return self.num_ambiguous / max(self.num_seen, 1)


@dataclass
class DensityControlState:
    """Running state of :class:`GitDensityControl` between cycles."""

    generator: torch.Generator
    """Draws the children's means."""
    history: List[CycleStats] = field(default_factory=list)


@dataclass
class GitDensityControl:
    """GIT-guided density control cycles (see the module docstring for the policy)."""

    cycles: int = 4
    """Number of cycles (0 disables density control); the last one only prunes."""
    start_step: int = 15000
    """Step of the first cycle; at or after the model's stop_split_at (splatfacto's default 15000)."""
    every: int = 1000
    """Steps between cycles: the training that lets split Gaussians settle into one instance."""
    gamma: float = 0.8
    """A view is ambiguous for a Gaussian when its most probable instance holds less than this."""
    theta_as: float = 0.5
    """A Gaussian is ambiguous when more than this share of the views seeing it are ambiguous."""
    min_weight: float = 0.5
    """A Gaussian is seen in a view when its traced weight there is >= this (alpha * T units: half a
    fully opaque pixel; the authors' release asks for more than 25 pixel hits). Weaker observations
    are a Gaussian behind others or grazing a view, where its instance distribution says little."""
    split_scale_factor: float = 2.0
    """Children's scales are the parent's divided by this."""
    prune_unseen: bool = True
    """Also prune the Gaussians that no training view sees (traced weight >= ``unseen_weight`` in
    none), as the authors' release does. No image constrains them (hidden inside or behind objects),
    so they barely change the renders but show up when an object is extracted and rendered alone."""
    unseen_weight: float = 0.5
    """With ``prune_unseen``, a Gaussian is unseen when its traced weight is below this in every
    training view (alpha * T units). The tracing keeps no observation below its own ``min_weight``
    (0.05), so values up to 0.05 all mean "no view traces it at all" (the authors' rule). Measured on
    the cluttered ablation scenes, 3 seeds, amodal object IoU of ``full`` / ``density_only``: 0.05:
    0.715 / 0.734; 0.5: 0.805 / 0.754; 2.0: 0.797 / 0.762 and +0.8 dB test PSNR
    (docs/benchmarks/pilot/README.md)."""
    split_hidden: bool = False
    """Also split the Gaussians that other surfaces partly hide in most views that see them
    (``trace3d_ns.git.visibility``): those whose tails reach below the surface an object rests on,
    which no training view constrains and an extracted object shows as a fringe along its contacts.
    A child wholly under the support is then unseen and pruned (``prune_unseen``)."""
    hidden_visible_share: float = 0.6
    """With ``split_hidden``: a view partly hides a Gaussian when it draws less than this share of
    what it would draw with nothing in front of it."""
    hidden_theta: float = 0.5
    """With ``split_hidden``: hidden when more than this share of the views that see it (traced
    weight >= ``min_weight``, footprint inside the image) partly hide it."""
    seed: int = 0
    """Seed of the children's sampled means."""

    def schedule(self, stop_split_at: int) -> List[int]:
        """The cycle steps; raises if they would overlap splatfacto's own densification."""
        if self.cycles <= 0:
            return []
        if self.every <= 0:
            raise ValueError(f"density control: every must be positive, got {self.every}")
        if self.start_step < stop_split_at:
            raise ValueError(
                f"density control starts at step {self.start_step}, before the model's stop_split_at "
                f"({stop_split_at}) where splatfacto's densification stops: set --pipeline.density.start-step "
                f">= {stop_split_at} or lower --pipeline.model.stop-split-at"
            )
        return [self.start_step + k * self.every for k in range(self.cycles)]

    def cycle_at(self, step: int) -> int:
        """Index of the cycle that runs at ``step``; raises if none does."""
        k, offset = divmod(step - self.start_step, self.every)
        if offset != 0 or not 0 <= k < self.cycles:
            raise ValueError(f"no density control cycle at step {step} (cycles at {self.start_step} + k * {self.every}, k < {self.cycles})")
        return k

    def ambiguity(self) -> AmbiguityConfig:
        return AmbiguityConfig(gamma=self.gamma, threshold=self.theta_as, min_weight=self.min_weight)

    def initialize_state(self, device: torch.device | str = "cpu") -> DensityControlState:
        return DensityControlState(generator=torch.Generator(device=device).manual_seed(self.seed))

    @torch.no_grad()
    def run_cycle(self, pipeline, state: DensityControlState, step: int) -> CycleStats:
        """The cycle of ``step`` on a training ``Trace3DPipeline`` (its model's ``optimizers`` set by training)."""
        cycle = self.cycle_at(step)
        model = pipeline.model
        split_last = model.density_children  # [N] bool, or empty before the first split
        if split_last.numel() == 0:
            split_last = None
        elif split_last.shape[0] != model.num_points:
            raise RuntimeError(
                f"density control: {model.num_points} Gaussians, but the previous cycle left "
                f"{split_last.shape[0]}; something else changed them between cycles"
            )
        num_before = model.num_points
        result = pipeline.run_instance_tracing(step=step)
        traces = model.instance_traces
        score, num_seen = ambiguity_scores(traces.remap_patches(result.patch_to_global), self.ambiguity())
        ambiguous = score > self.theta_as  # [N]
        last = cycle == self.cycles - 1
        num_visible = views_seeing(traces, self.unseen_weight)  # [N]
        hidden = None
        if self.split_hidden:
            hidden = self._hidden(pipeline, traces)  # [N]
        prune, split = plan_cycle(ambiguous, num_visible, split_last, last, self.prune_unseen, hidden)

        params, optimizers, strategy_state = model.gauss_params, model.optimizers, model.strategy_state
        keep = prune_gaussians(params, optimizers, strategy_state, prune)  # [N - pruned]
        children = split_gaussians(params, optimizers, strategy_state, split[keep], state.generator, self.split_scale_factor)
        index = keep[children]  # [N'] source row in the traced model
        model.set_instances(model.instance_labels[index], model.instance_confidence[index], traces.index_select(index))

        previous = split_last if split_last is not None else torch.zeros_like(ambiguous)
        num_split = int(split.sum())
        model.density_children = torch.arange(model.num_points, device=index.device) >= model.num_points - 2 * num_split
        stats = CycleStats(
            step=step,
            cycle=cycle,
            num_before=num_before,
            num_seen=int((num_seen > 0).sum()),
            num_ambiguous=int(ambiguous.sum()),
            num_children=int(previous.sum()),
            num_ambiguous_children=int((ambiguous & previous).sum()),
            num_pruned=int(prune.sum()),
            num_pruned_unseen=int((prune & (num_visible == 0)).sum()),
            num_split=num_split,
            num_after=model.num_points,
            num_hidden=int(hidden.sum()) if hidden is not None else 0,
        )
        state.history.append(stats)
        return stats

    def _hidden(self, pipeline, traces) -> Tensor:
        """[N] bool: Hs > hidden_theta for the model's current Gaussians (``trace3d_ns.git.visibility``)."""
        from trace3d_ns.git.visibility import HiddenConfig, hidden_scores, model_view_masses

        dm = pipeline.datamanager
        sizes = [tuple(m.shape) for m in dm.train_patch_maps()]
        config = HiddenConfig(visible_share=self.hidden_visible_share, threshold=self.hidden_theta, min_weight=self.min_weight)
        score, counted = hidden_scores(traces, model_view_masses(pipeline.model, dm.train_dataset.cameras, sizes), config)
        return (score > self.hidden_theta) & (counted > 0)


def save_history(state: DensityControlState, path: Path) -> None:
    """Write the cycles' statistics as a JSON list."""
    rows = [{**asdict(s), "ambiguous_fraction": s.ambiguous_fraction} for s in state.history]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
