"""Gaussian Instance Tracing: which instance patch every Gaussian belongs to, in every view.

For one view with patch map ``patches`` [H, W] and the renderer's contributions (Gaussian ``g``
put weight ``alpha * T`` into pixel ``p``), the trace of ``g`` is

    w[g, j] = sum of alpha * T over the pixels p of patch j that g contributes to,

an exact scatter-add (``index_add_`` into a temporary per-view buffer, or over sorted unique keys
for views too large for one; ``index_add_`` is atomic on the GPU: no update is lost). ``W[g, j] = w[g, j] / sum_j w[g, j]`` is a probability over the view's patches and the
total ``sum_j w[g, j]`` says how visible ``g`` is. Patch ``0`` ("covered by no mask") is traced
like any other patch. ``mode="count"`` adds 1 per pixel instead of ``alpha * T`` (what the
authors' release does by default), for comparison.

Storage is sparse (:class:`InstanceTraces`): one *observation* per (Gaussian, view) with a
total weight >= ``min_weight``, holding that total (bfloat16: 2 bytes like float16, but float32's range,
so a Gaussian drawing more than 65504 in one view, e.g. a large one at megapixel size, stays finite;
relative rounding <= 2^-8) and its top-k patches (patch id, prob quantised to uint8,
prob >= ``min_prob``; the top-1 is always kept). The mass of the dropped
patches is implicit: ``1 - sum(kept probs)``. Observations are sorted by (Gaussian, view) in CSR
form (offsets per Gaussian) and hold their most probable patch inline; the other kept patches
(rare: most Gaussians lie inside one patch) are a separate list of extra entries sorted by
observation. View and patch ids use the smallest integer type that holds them (uint8 up to 256
views / patches per view), so an observation costs 5 bytes and an extra entry 6. Memory grows with
the number of observations, never with Gaussians x patches x views.

Building the store streams: :class:`TraceAccumulator` keeps each traced view packed (the 4 bytes
the store keeps per observation, extras as in the store, and the view's Gaussians as int32 ids or
a bit mask over all Gaussians, whichever is smaller), and ``build`` places the observations with
a counting sort on the Gaussian (each view's observations are already sorted by Gaussian, so
visiting views in order gives (Gaussian, view) order), releasing each view as it is placed:
tracing holds one view's pairs plus the packed views (about the store's size), building about
twice the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from trace3d_ns.rendering import Contributions

PROB_SCALE = 255.0
"""Probabilities are stored as uint8 ``round(prob * PROB_SCALE)``."""
WEIGHT_DTYPE = torch.bfloat16
"""dtype of the stored per-(Gaussian, view) total weights: float16 overflows to inf above 65504."""


@dataclass
class TraceConfig:
    """What a trace keeps."""

    mode: Literal["weight", "count"] = "weight"
    """weight: add alpha * T per pixel (the paper); count: add 1 per pixel (the authors' release)."""
    topk: int = 2
    """Patches kept per (Gaussian, view), most probable first."""
    min_prob: float = 0.02
    """Patches below this probability are dropped (the top-1 is always kept)."""
    dense_limit: int = 1 << 25
    """A view is accumulated in a temporary dense (Gaussians x patches) float32 buffer when it has at
    most this many cells (128 MB), else through sorted unique keys; both are exact."""
    min_weight: float = 0.05
    """(Gaussian, view) observations whose total weight is below this are not stored: unseen. In
    alpha * T units (a fully opaque Gaussian covering one pixel has weight 1), pixels in count mode.
    The same value as the merging and ambiguity visibility threshold, so nothing they use is lost."""


@dataclass
class ViewTrace:
    """The trace of one view: observation ``i`` of Gaussian ``gaussian[i]`` owns the next ``count[i]``
    entries (entries follow the observations' order)."""

    gaussian: Tensor  # [O] int64, each Gaussian at most once
    weight: Tensor  # [O] float32 total weight
    count: Tensor  # [O] int64 kept entries per observation, >= 1
    patch: Tensor  # [E] int64, per observation by descending prob
    prob: Tensor  # [E] float32


def trace_view(
    gaussian_ids: Tensor,  # [P] int64
    labels: Tensor,  # [P] int64 patch of each pair's pixel
    weights: Tensor,  # [P] float32 alpha * T (ignored in count mode)
    num_labels: int,
    config: TraceConfig,
) -> ViewTrace:
    """Scatter-add the pairs into per-(Gaussian, patch) weights (``index_add_``: exact, atomic on the
    GPU), normalise per Gaussian, keep top-k. Observations come out sorted by Gaussian."""
    device = gaussian_ids.device
    pair_w = (torch.ones_like(weights) if config.mode == "count" else weights).float()
    pair_key = gaussian_ids * num_labels + labels  # [P]
    span = (int(gaussian_ids.max()) + 1) * num_labels if gaussian_ids.numel() else 0
    if span <= config.dense_limit:  # one index_add_ into a per-view buffer, then its non-zeros
        dense = torch.zeros(span, device=device).index_add_(0, pair_key, pair_w)
        keys = torch.nonzero(dense).squeeze(1)  # [U] ascending (every pair weight is > 0)
        w = dense[keys]  # [U]
    else:  # sort-based: memory stays with the pairs
        keys, inverse = torch.unique(pair_key, return_inverse=True)  # [U], [P]
        w = torch.zeros(keys.numel(), device=device).index_add_(0, inverse, pair_w)  # [U]
    gaussian = torch.div(keys, num_labels, rounding_mode="floor")  # [U] ascending
    return trace_sums(gaussian, keys - gaussian * num_labels, w, config)


def trace_sums(
    gaussian: Tensor,  # [U] int64 ascending
    patch: Tensor,  # [U] int64, one row per (Gaussian, patch)
    w: Tensor,  # [U] float32 summed weight of the Gaussian in the patch
    config: TraceConfig,
) -> ViewTrace:
    """Normalise per-(Gaussian, patch) sums per Gaussian and keep the top-k patches: the part of
    `trace_view` after its scatter-add, for sums computed elsewhere (`rendering.patch_weights`)."""
    device = gaussian.device
    obs_gaussian, obs_of_key = torch.unique_consecutive(gaussian, return_inverse=True)  # [O], [U]
    total = torch.zeros(obs_gaussian.numel(), device=device).index_add_(0, obs_of_key, w)  # [O]
    prob = w / total[obs_of_key]  # [U]

    # Most probable first within each Gaussian: stable sort by prob, then stable sort by Gaussian.
    order = torch.argsort(prob, descending=True, stable=True)
    order = order[torch.argsort(obs_of_key[order], stable=True)]
    obs, patch, prob = obs_of_key[order], patch[order], prob[order]
    starts = _exclusive_cumsum(torch.bincount(obs, minlength=obs_gaussian.numel()))  # [O]
    rank = torch.arange(obs.numel(), device=device) - starts[obs]  # [U]
    keep = (rank < config.topk) & ((prob >= config.min_prob) | (rank == 0)) & (total[obs] >= config.min_weight)
    seen = total >= config.min_weight  # [O]
    return ViewTrace(
        gaussian=obs_gaussian[seen],
        weight=total[seen],
        count=torch.bincount(obs[keep], minlength=obs_gaussian.numel())[seen],
        patch=patch[keep],
        prob=prob[keep],
    )


@dataclass
class InstanceTraces:
    """Sparse per-(Gaussian, view) instance distributions (see the module docstring).

    Observation ``o`` of Gaussian ``g`` is ``offsets[g] <= o < offsets[g + 1]``. Its most probable
    patch is stored inline (``obs_patch``, ``obs_prob``); its other kept patches (at most
    ``topk - 1``, most Gaussians have none) are *extra* entries, sorted by observation.
    """

    num_gaussians: int
    num_patches: Tensor  # [L] int64: patch ids of view v lie in [0, num_patches[v])
    offsets: Tensor  # [N + 1] int64 CSR over observations, sorted by (Gaussian, view)
    obs_view: Tensor  # [O] uint8 (int16 beyond 256 views)
    obs_weight: Tensor  # [O] bfloat16 total weight (alpha * T, or pixels in count mode)
    obs_patch: Tensor  # [O] uint8 most probable patch (int16 / int32 when a view has more patches)
    obs_prob: Tensor  # [O] uint8 its round(prob * 255)
    extra_obs: Tensor  # [X] int32 observation of each extra entry, ascending
    extra_patch: Tensor  # [X] same dtype as obs_patch
    extra_prob: Tensor  # [X] uint8, descending within an observation
    config: TraceConfig = field(default_factory=TraceConfig)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_views(
        cls,
        views: Iterable[Tuple[int, Contributions, Tensor]],
        num_gaussians: int,
        num_views: int,
        config: Optional[TraceConfig] = None,
    ) -> "InstanceTraces":
        """Trace every ``(view index, contributions, patch map [H, W])``."""
        acc = TraceAccumulator(num_gaussians, num_views, config)
        for view, contrib, patch_map in views:
            acc.add_view(view, contrib, patch_map)
        return acc.build()

    @classmethod
    def from_entries(
        cls,
        num_gaussians: int,
        num_patches: Tensor,
        offsets: Tensor,
        obs_view: Tensor,
        obs_weight: Tensor,
        entry_obs: Tensor,
        entry_patch: Tensor,
        entry_q: Tensor,
        config: TraceConfig,
    ) -> "InstanceTraces":
        """Store from observation arrays and entries ([E], grouped by ascending observation, most
        probable first within one; every observation has at least one; ``entry_q`` are quantised
        probabilities)."""
        first = torch.ones_like(entry_obs, dtype=torch.bool)
        first[1:] = entry_obs[1:] != entry_obs[:-1]
        dtype = _id_dtype(int(num_patches.max()) - 1 if num_patches.numel() else 0)
        q = entry_q.clamp(max=int(PROB_SCALE)).to(torch.uint8)
        return cls(
            num_gaussians=num_gaussians,
            num_patches=num_patches,
            offsets=offsets,
            obs_view=obs_view.to(_id_dtype(num_patches.numel() - 1)),
            obs_weight=obs_weight.to(WEIGHT_DTYPE),
            obs_patch=entry_patch[first].to(dtype),
            obs_prob=q[first],
            extra_obs=entry_obs[~first].to(torch.int32),
            extra_patch=entry_patch[~first].to(dtype),
            extra_prob=q[~first],
            config=config,
        )

    # ---- size and derived indices -------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return self.num_patches.numel()

    @property
    def num_observations(self) -> int:
        return self.obs_view.numel()

    @property
    def num_entries(self) -> int:
        """Kept (patch, prob) pairs: one per observation plus the extras."""
        return self.num_observations + self.extra_obs.numel()

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    def _tensors(self) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(self) if isinstance(getattr(self, f.name), Tensor))

    def nbytes(self) -> int:
        """Bytes held by the store's tensors."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._tensors())

    def obs_gaussian(self) -> Tensor:
        """Gaussian of every observation. [O] int64"""
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_gaussians, device=self.device), counts)

    def entries(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Every kept entry as (observation [E] int64, patch [E] int64, prob [E] float32), grouped by
        observation, most probable first."""
        obs = torch.cat([torch.arange(self.num_observations, device=self.device), self.extra_obs.long()])
        order = torch.argsort(obs, stable=True)
        patch = torch.cat([self.obs_patch, self.extra_patch]).long()
        prob = torch.cat([self.obs_prob, self.extra_prob]).float() / PROB_SCALE
        return obs[order], patch[order], prob[order]

    def max_prob(self) -> Tensor:
        """max_j W[g, j] of every observation. [O] float32"""
        return self.obs_prob.float() / PROB_SCALE

    def argmax(self) -> Tensor:
        """argmax_j W[g, j] of every observation. [O] int64"""
        return self.obs_patch.long()

    def residual_mass(self) -> Tensor:
        """Probability mass of the dropped patches, 1 - sum of kept probs (>= 0). [O] float32"""
        kept = self.max_prob().index_add(0, self.extra_obs.long(), self.extra_prob.float() / PROB_SCALE)
        return (1.0 - kept).clamp(min=0.0)

    def majority_labels(self) -> Tensor:
        """Per Gaussian, the patch id with the most traced weight summed over all views (weight x
        probability of every kept entry; the smallest id on a tie); -1 for a Gaussian no view sees.
        Meaningful only where an id means the same thing in every view: traced ground-truth maps, or
        consistent (global) ids. Sparse: memory grows with the entries, not Gaussians x ids. [N]"""
        labels = torch.full((self.num_gaussians,), -1, dtype=torch.long, device=self.device)
        obs, patch, prob = self.entries()
        if obs.numel() == 0:
            return labels
        span = int(patch.max()) + 1
        keys, inverse = torch.unique(self.obs_gaussian()[obs] * span + patch, return_inverse=True)  # [K]
        votes = torch.zeros(keys.numel(), device=self.device).index_add_(0, inverse, self.obs_weight[obs].float() * prob)
        gaussian, patch_id = torch.div(keys, span, rounding_mode="floor"), keys % span  # [K] each
        best = torch.zeros(self.num_gaussians, device=self.device).scatter_reduce_(0, gaussian, votes, "amax")
        top = (votes == best[gaussian]) & (votes > 0)
        labels.scatter_reduce_(0, gaussian[top], patch_id[top], "amin", include_self=False)
        return labels

    # ---- per-view access ----------------------------------------------------------------------
    def view_observations(self, view: int) -> Tuple[Tensor, Tensor]:
        """(observation indices [o], their Gaussians [o]) of one view."""
        obs = torch.nonzero(self.obs_view == view).squeeze(1)
        return obs, self.obs_gaussian()[obs]

    def weights(self, view: int) -> Tensor:
        """Total weight of every Gaussian in one view, 0 where unseen. [N] float32"""
        obs, gaussians = self.view_observations(view)
        out = torch.zeros(self.num_gaussians, device=self.device)
        out[gaussians] = self.obs_weight[obs].float()
        return out

    def visible(self, view: int, min_weight: float = 0.0) -> Tensor:
        """Gaussians observed in ``view`` with total weight >= ``min_weight``. [N] bool"""
        obs, gaussians = self.view_observations(view)
        out = torch.zeros(self.num_gaussians, dtype=torch.bool, device=self.device)
        out[gaussians] = self.obs_weight[obs].float() >= min_weight
        return out

    def view_top(self, view: int) -> Tuple[Tensor, Tensor]:
        """(argmax patch [N] int64, -1 where unseen; its probability [N] float32, 0 where unseen)."""
        obs, gaussians = self.view_observations(view)
        patch = torch.full((self.num_gaussians,), -1, dtype=torch.long, device=self.device)
        prob = torch.zeros(self.num_gaussians, device=self.device)
        patch[gaussians] = self.argmax()[obs]
        prob[gaussians] = self.max_prob()[obs]
        return patch, prob

    def view_dense(self, view: int) -> Tensor:
        """The kept probabilities of one view as a dense [N, num_patches[view]] matrix (small scenes)."""
        obs, patch, prob = self.entries()
        sel = self.obs_view[obs] == view
        out = torch.zeros(self.num_gaussians, int(self.num_patches[view]), device=self.device)
        out[self.obs_gaussian()[obs[sel]], patch[sel]] = prob[sel]
        return out

    # ---- edits --------------------------------------------------------------------------------
    def index_select(self, index: Tensor) -> "InstanceTraces":
        """A store whose Gaussian ``i`` is this store's Gaussian ``index[i]`` (a long index, repeats
        allowed, e.g. split children inheriting their parent's rows) or the kept Gaussians of a bool
        mask (pruning). Observations and entries are copied."""
        if index.dtype == torch.bool:
            index = torch.nonzero(index).squeeze(1)
        index = index.to(self.device).long()
        counts = (self.offsets[1:] - self.offsets[:-1])[index]  # [M]
        obs = _segment_indices(self.offsets[:-1][index], counts)  # [O']
        extra_obs = self.extra_obs.long()
        start = torch.searchsorted(extra_obs, obs)  # [O'] first extra of each kept observation
        extra_counts = torch.searchsorted(extra_obs, obs, right=True) - start  # [O']
        extras = _segment_indices(start, extra_counts)  # [X']
        new_obs = torch.repeat_interleave(torch.arange(obs.numel(), device=self.device), extra_counts)
        return replace(
            self,
            num_gaussians=index.numel(),
            offsets=torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]),
            obs_view=self.obs_view[obs],
            obs_weight=self.obs_weight[obs],
            obs_patch=self.obs_patch[obs],
            obs_prob=self.obs_prob[obs],
            extra_obs=new_obs.to(torch.int32),
            extra_patch=self.extra_patch[extras],
            extra_prob=self.extra_prob[extras],
        )

    def remap_patches(self, luts: Sequence[Tensor]) -> "InstanceTraces":
        """Relabel patches per view, ``new = luts[v][old]`` (e.g. merged or global ids), summing the
        probabilities of patches that map to the same id. ``luts[v]`` is int [num_patches[v]]."""
        if len(luts) != self.num_views:
            raise ValueError(f"expected {self.num_views} lookup tables, got {len(luts)}")
        luts = [lut.to(self.device).long() for lut in luts]
        flat = torch.cat(luts)  # [sum T_v]
        base = _exclusive_cumsum(torch.tensor([lut.numel() for lut in luts], device=self.device))  # [L]
        obs = torch.cat([torch.arange(self.num_observations, device=self.device), self.extra_obs.long()])  # [E]
        old = torch.cat([self.obs_patch, self.extra_patch]).long()
        patch = flat[base[self.obs_view[obs].long()] + old]  # [E]
        span = int(flat.max()) + 1 if flat.numel() else 1
        keys, inverse = torch.unique(obs * span + patch, return_inverse=True)  # sorted by observation
        q = torch.zeros(keys.numel(), dtype=torch.long, device=self.device)
        q.index_add_(0, inverse, torch.cat([self.obs_prob, self.extra_prob]).long())
        key_obs = torch.div(keys, span, rounding_mode="floor")
        order = torch.argsort(q, descending=True, stable=True)
        order = order[torch.argsort(key_obs[order], stable=True)]
        num_patches = torch.stack([lut.max() + 1 if lut.numel() else lut.new_ones(()) for lut in luts])
        return InstanceTraces.from_entries(
            self.num_gaussians, num_patches, self.offsets, self.obs_view, self.obs_weight,
            key_obs[order], (keys - key_obs * span)[order], q[order], self.config,
        )

    def to(self, device: Union[str, torch.device]) -> "InstanceTraces":
        return replace(self, **{n: getattr(self, n).to(device) for n in self._tensors()})


@dataclass
class _PackedView:
    """One traced view as the accumulator keeps it: what the store keeps per observation, plus its
    Gaussians (the store implies them by position) as int32 ids or, when that is smaller (a view
    seeing more than 1/32 of the Gaussians), as a bit mask over all Gaussians."""

    gaussian: Tensor  # [O] int32 ascending ids, or [ceil(N / 8)] uint8 bit mask (bit g % 8 of byte g // 8)
    bitmask: bool
    weight: Tensor  # [O] WEIGHT_DTYPE total weight
    patch: Tensor  # [O] most probable patch (smallest id dtype of the view)
    prob: Tensor  # [O] uint8 its quantised probability
    extra_obs: Tensor  # [X] int32 observation (in this view) of each other kept patch, ascending
    extra_patch: Tensor  # [X]
    extra_prob: Tensor  # [X] uint8, descending within an observation

    def ids(self) -> Tensor:
        """The view's Gaussians, ascending. [O] int64"""
        if not self.bitmask:
            return self.gaussian.long()
        bits = (self.gaussian[:, None] >> torch.arange(8, dtype=torch.uint8, device=self.gaussian.device)) & 1
        return torch.nonzero(bits.reshape(-1)).squeeze(1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, Tensor))


def _pack(trace: ViewTrace, num_labels: int, num_gaussians: int) -> _PackedView:
    """Quantise a :class:`ViewTrace` (probabilities to uint8, ids to the smallest dtypes)."""
    device = trace.gaussian.device
    obs = torch.repeat_interleave(torch.arange(trace.gaussian.numel(), device=device), trace.count)  # [E]
    first = torch.ones_like(obs, dtype=torch.bool)
    first[1:] = obs[1:] != obs[:-1]
    dtype = _id_dtype(num_labels - 1)
    q = torch.round(trace.prob * PROB_SCALE).clamp(1, int(PROB_SCALE)).to(torch.uint8)  # [E]
    num_bytes = (num_gaussians + 7) // 8
    bitmask = 4 * trace.gaussian.numel() > num_bytes
    if bitmask:
        flags = torch.zeros(num_bytes * 8, dtype=torch.uint8, device=device)
        flags[trace.gaussian] = 1
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
        gaussian = (flags.reshape(num_bytes, 8) * weights).sum(dim=1, dtype=torch.uint8)  # [ceil(N / 8)]
    else:
        gaussian = trace.gaussian.to(torch.int32)
    return _PackedView(
        gaussian=gaussian,
        bitmask=bitmask,
        weight=trace.weight.to(WEIGHT_DTYPE),
        patch=trace.patch[first].to(dtype),
        prob=q[first],
        extra_obs=obs[~first].to(torch.int32),
        extra_patch=trace.patch[~first].to(dtype),
        extra_prob=q[~first],
    )


class TraceAccumulator:
    """Collects traced views (packed, see the module docstring), then builds one :class:`InstanceTraces`."""

    def __init__(self, num_gaussians: int, num_views: int, config: Optional[TraceConfig] = None) -> None:
        self.num_gaussians = num_gaussians
        self.num_patches = [1] * num_views
        self.config = config or TraceConfig()
        self._views: dict[int, _PackedView] = {}
        self._per_gaussian: Optional[Tensor] = None  # [N] int32 observations of each Gaussian so far

    def add_view(self, view: int, contrib: Contributions, patch_map: Tensor) -> ViewTrace:
        """Trace one view; ``patch_map`` [H, W] must have the contributions' resolution. Tracing a
        view again replaces its earlier trace."""
        if tuple(patch_map.shape) != (contrib.height, contrib.width):
            raise ValueError(f"patch map {tuple(patch_map.shape)} != render size {(contrib.height, contrib.width)}")
        flat = patch_map.reshape(-1).to(contrib.pixel_ids.device).long()  # [H*W]
        num_labels = int(flat.max()) + 1 if flat.numel() else 1
        trace = trace_view(contrib.gaussian_ids, flat[contrib.pixel_ids], contrib.weights, num_labels, self.config)
        self.add_trace(view, trace, num_labels)
        return trace

    def add_view_sums(self, view: int, gaussian: Tensor, patch: Tensor, weight: Tensor, num_labels: int) -> ViewTrace:
        """Trace one view from its per-(Gaussian, patch) weight sums (``rendering.patch_weights``;
        weight mode only) over a patch map with ``num_labels`` ids."""
        if self.config.mode != "weight":
            raise ValueError("per-patch sums carry alpha * T weights: count mode needs the pairs (add_view)")
        trace = trace_sums(gaussian, patch, weight, self.config)
        self.add_trace(view, trace, num_labels)
        return trace

    def add_trace(self, view: int, trace: ViewTrace, num_labels: int) -> None:
        """Keep an already traced view (patch ids in ``[0, num_labels)``), replacing an earlier one."""
        if not 0 <= view < len(self.num_patches):
            raise ValueError(f"view {view} is outside [0, {len(self.num_patches)})")
        packed = _pack(trace, num_labels, self.num_gaussians)
        if self._per_gaussian is None:
            self._per_gaussian = torch.zeros(self.num_gaussians, dtype=torch.int32, device=trace.gaussian.device)
        old = self._views.pop(view, None)
        if old is not None:
            self._per_gaussian[old.ids()] -= 1
        self._per_gaussian[trace.gaussian] += 1  # each Gaussian at most once per view
        self.num_patches[view] = num_labels
        self._views[view] = packed

    def nbytes(self) -> int:
        """Bytes held by the packed views."""
        return sum(p.nbytes() for p in self._views.values())

    def build(self) -> InstanceTraces:
        """The CSR store, observations sorted by (Gaussian, view). Consumes the accumulated views
        (each is released once placed); the accumulator is empty afterwards."""
        views = sorted(self._views)
        device = self._views[views[0]].weight.device if views else torch.device("cpu")
        per_gaussian = self._per_gaussian if self._per_gaussian is not None else torch.zeros(
            self.num_gaussians, dtype=torch.int32, device=device
        )
        offsets = torch.cumsum(per_gaussian, 0, dtype=torch.long)
        offsets = torch.cat([offsets.new_zeros(1), offsets])  # [N + 1]
        self._per_gaussian = None
        num_obs = int(offsets[-1])
        num_patches = torch.tensor(self.num_patches, device=device)
        patch_dtype = _id_dtype(int(num_patches.max()) - 1 if num_patches.numel() else 0)
        obs_view = torch.empty(num_obs, dtype=_id_dtype(len(self.num_patches) - 1), device=device)
        obs_weight = torch.empty(num_obs, dtype=WEIGHT_DTYPE, device=device)
        obs_patch = torch.empty(num_obs, dtype=patch_dtype, device=device)
        obs_prob = torch.empty(num_obs, dtype=torch.uint8, device=device)
        cursor = offsets[:-1].clone()  # [N] next free observation of each Gaussian
        extra_obs, extra_patch, extra_prob = [], [], []
        for v in views:  # ascending views: each Gaussian's observations come out in view order
            p = self._views.pop(v)
            g = p.ids()  # [O_v] ascending, each Gaussian at most once
            pos = cursor[g]  # [O_v]
            cursor[g] += 1
            obs_view[pos] = v
            obs_weight[pos] = p.weight
            obs_patch[pos] = p.patch.to(patch_dtype)
            obs_prob[pos] = p.prob
            extra_obs.append(pos[p.extra_obs.long()].to(torch.int32))
            extra_patch.append(p.extra_patch.to(patch_dtype))
            extra_prob.append(p.extra_prob)
            del p, g, pos
        if extra_obs:
            xo, xp, xq = torch.cat(extra_obs), torch.cat(extra_patch), torch.cat(extra_prob)
            order = torch.argsort(xo, stable=True)  # by observation; stable keeps descending probs
            xo, xp, xq = xo[order], xp[order], xq[order]
        else:
            xo = torch.zeros(0, dtype=torch.int32, device=device)
            xp = torch.zeros(0, dtype=patch_dtype, device=device)
            xq = torch.zeros(0, dtype=torch.uint8, device=device)
        return InstanceTraces(
            num_gaussians=self.num_gaussians,
            num_patches=num_patches,
            offsets=offsets,
            obs_view=obs_view,
            obs_weight=obs_weight,
            obs_patch=obs_patch,
            obs_prob=obs_prob,
            extra_obs=xo,
            extra_patch=xp,
            extra_prob=xq,
            config=self.config,
        )


@torch.no_grad()
def trace_model(
    model,
    cameras,
    patch_maps: Sequence[Tensor],
    config: Optional[TraceConfig] = None,
    views: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> InstanceTraces:
    """Trace a :class:`~trace3d_ns.model.Trace3DModel` through its training views.

    Args:
        model: the model; its current Gaussians (``activated_gaussians()``) are traced on its device.
        cameras: nerfstudio ``Cameras`` of the training views, in patch-map order.
        patch_maps: one int [H, W] patch map per camera (e.g. ``datamanager.train_patch_maps()``).
        config: what to keep.
        views: which of the cameras to trace (default all); the store still has one slot per camera.
        progress: show a progress bar.

    Each view is rendered at its *patch map's* resolution (see :func:`view_contributions`), so no
    patch is dropped or blurred by downscaling the map. Views are traced one at a time: memory holds
    one view's pairs plus the packed traces (see :class:`TraceAccumulator`).
    """
    from rich.progress import track

    from trace3d_ns.device import release_freed_host_memory
    from trace3d_ns.rendering import patch_weights

    g = model.activated_gaussians()
    acc = TraceAccumulator(g["means"].shape[0], len(patch_maps), config)
    indices = range(len(patch_maps)) if views is None else views
    for i in track(indices, description="Tracing Gaussian instances", disable=not progress):
        patch_map = patch_maps[i].to(model.device)
        if acc.config.mode != "weight":
            acc.add_view(i, view_contributions(model, cameras, i, tuple(patch_map.shape), g), patch_map)
        else:
            viewmat, K = _view_camera(model, cameras, i, tuple(patch_map.shape))
            sums = patch_weights(
                g["means"], g["quats"], g["scales"], g["opacities"], viewmat, K, patch_map,
                rasterize_mode=model.config.rasterize_mode, backend=model.config.rasterizer,
            )  # per (Gaussian, patch), without listing the view's pairs on the compiled backend
            acc.add_view_sums(i, *sums, int(patch_map.max()) + 1 if patch_map.numel() else 1)
            del sums
        if model.device.type == "cpu":
            release_freed_host_memory()  # the view's arrays, so that the store is what stays
    return acc.build()


@torch.no_grad()
def view_contributions(model, cameras, index: int, size: Tuple[int, int], gaussians=None) -> Contributions:
    """Contributions of training view ``index`` rendered at ``size`` = (height, width), e.g. its patch
    map's. The camera is the one training renders with (the camera optimizer's pose while training),
    at its full resolution, not the current training resolution: downscaled, K is divided by the
    scale but the size is floored, and scaling that back up by the size ratio would shift every
    pixel by up to about one pixel. K is rescaled by (width / camera width, height / camera height),
    exactly 1 for a patch map at the image's resolution. ``gaussians``: ``model.activated_gaussians()``
    if already at hand."""
    from trace3d_ns.rendering import contributions

    g = model.activated_gaussians() if gaussians is None else gaussians
    viewmat, K = _view_camera(model, cameras, index, size)
    return contributions(
        g["means"], g["quats"], g["scales"], g["opacities"], viewmat, K, size[1], size[0],
        rasterize_mode=model.config.rasterize_mode, backend=model.config.rasterizer,
    )


def _view_camera(model, cameras, index: int, size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """(viewmat [4, 4], K [3, 3]) of training view ``index`` at full resolution (see
    ``view_contributions``), K rescaled to ``size`` = (H, W)."""
    viewmat, K, width, height = model.camera_matrices(cameras[index : index + 1], full_resolution=True)
    ph, pw = size
    scale = torch.tensor([pw / width, ph / height, 1.0], device=K.device)[:, None]
    return viewmat[0], K[0] * scale


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, 0) - x


def _segment_indices(starts: Tensor, counts: Tensor) -> Tensor:
    """Concatenated ranges ``starts[i] .. starts[i] + counts[i] - 1``. [sum(counts)] int64"""
    counts = counts.long()
    total = int(counts.sum())
    shift = torch.repeat_interleave(starts.long() - _exclusive_cumsum(counts), counts, output_size=total)
    return torch.arange(total, device=counts.device) + shift


def _id_dtype(max_id: int) -> torch.dtype:
    """Smallest integer dtype that holds ids 0..max_id."""
    return torch.uint8 if max_id < 2**8 else torch.int16 if max_id < 2**15 else torch.int32
