"""Trace3DPipeline: the training pipeline plus the Gaussian Instance Tracing stage.

GIT needs both the model (its Gaussians) and the datamanager (training cameras and patch maps),
so it lives here. At `git_step` (after the RGB warm-up) it traces every training view, builds
consistent instance maps, labels the Gaussians, stores the maps in the mask cache, and from then
on the training batches carry them as `instances` (the contrastive loss prefers them to raw
patches). `run_instance_tracing()` also works on a loaded, trained pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Type

import torch

from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE
from trace3d_ns.git.density import GitDensityControl, save_history
from trace3d_ns.git.merging import MergeConfig
from trace3d_ns.git.tracing import TraceConfig

CONSISTENT_KIND = "consistent"
"""Mask-cache kind of the consistent instance maps."""


@dataclass
class Trace3DPipelineConfig(VanillaPipelineConfig):
    """VanillaPipeline with the Gaussian Instance Tracing stage."""

    _target: Type = field(default_factory=lambda: Trace3DPipeline)
    git_step: int = 1000
    """Training step after which Gaussian Instance Tracing runs (after the RGB warm-up); -1 disables it."""
    trace: TraceConfig = field(default_factory=TraceConfig)
    """How contributions become per-Gaussian instance distributions."""
    merge: MergeConfig = field(default_factory=MergeConfig)
    """How patches merge into consistent instances."""
    use_consistent_labels: bool = True
    """Train the features on the consistent instance maps once GIT made them (False: keep the raw
    patches, e.g. for the paper's "density control only" ablation)."""
    density: GitDensityControl = field(default_factory=GitDensityControl)
    """GIT-guided density control cycles (after splatfacto's densification): split ambiguous Gaussians,
    prune those splitting left ambiguous; statistics go to density_control.json in the run folder."""


class Trace3DPipeline(VanillaPipeline):
    """Adds `run_instance_tracing` and the training callback that calls it at `git_step`."""

    config: Trace3DPipelineConfig

    def __init__(self, config: Trace3DPipelineConfig, device: str, *args, **kwargs) -> None:
        super().__init__(config, device, *args, **kwargs)
        train = getattr(self.datamanager, "train_dataset", None)
        if train is not None:  # feature selection traces rendered features back over these views
            self.model.selection_cameras = train.cameras
        self._masks_checked = False

    def _check_masks_span_patches(self) -> None:
        """Tell the model whether the training masks overlap (``Trace3DModel.masks_span_patches``);
        once, at the first training step (the masks are computed or loaded by then), and only when
        ``contrastive_raw_weight`` makes it matter."""
        from trace3d_ns.data.patches import masks_span_patches

        self._masks_checked = True
        matrices = self.datamanager.train_patch_alike()
        self.model.masks_span_patches = masks_span_patches(matrices)
        if not self.model.masks_span_patches:
            why = (
                "the patch cache was written without the masks' alike matrices (delete it to recompute them)"
                if all(m is None for m in matrices) else "the masks partition every training view"
            )
            CONSOLE.log(f"contrastive_raw_weight is not applied: {why}; the features learn from the consistent maps alone")

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        if self.config.git_step >= 0:
            callbacks.append(
                TrainingCallback(
                    [TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self._trace_at_step, iters=(self.config.git_step,)
                )
            )
        density_steps = self.config.density.schedule(self.model.config.stop_split_at)
        if density_steps:
            self.density_state = self.config.density.initialize_state(self.model.device)
            trainer = training_callback_attributes.trainer
            log = None if trainer is None else trainer.base_dir / "density_control.json"
            callbacks.append(
                TrainingCallback(
                    [TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self._density_cycle, iters=tuple(density_steps),
                    kwargs={"log": log},
                )
            )
        return callbacks

    def get_train_loss_dict(self, step: int):
        """VanillaPipeline's step, with the batch handed to the model before its render (see
        ``Trace3DModel.plan_contrastive_samples``)."""
        camera, batch = self.datamanager.next_train(step)
        if not self._masks_checked and self.model.config.contrastive_raw_weight > 0:
            self._check_masks_span_patches()
        self.model.plan_contrastive_samples(batch)
        model_outputs = self._model(camera)  # the DDP wrapper when world_size > 1
        metrics_dict = self.model.get_metrics_dict(model_outputs, batch)
        loss_dict = self.model.get_loss_dict(model_outputs, batch, metrics_dict)
        return model_outputs, loss_dict, metrics_dict

    def _density_cycle(self, step: int, log: Optional[Path]) -> None:
        s = self.config.density.run_cycle(self, self.density_state, step)
        CONSOLE.log(
            f"Density control cycle {s.cycle}: {s.num_ambiguous}/{s.num_seen} seen Gaussians ambiguous, "
            f"{s.num_ambiguous_children}/{s.num_children} children still ambiguous, {s.num_pruned} pruned, "
            f"{s.num_split} split: {s.num_before} -> {s.num_after} Gaussians"
        )
        if log is not None:
            save_history(self.density_state, log)

    def _trace_at_step(self, step: int) -> None:
        self.run_instance_tracing(step=step)

    @torch.no_grad()
    def label_from_features(self, config=None) -> torch.Tensor:
        """Per-Gaussian instance labels from clustering the lifted features
        (``trace3d_ns.features.clustering``), in place of Gaussian Instance Tracing's. Returns them [N]."""
        from trace3d_ns.features.clustering import FeatureClusteringConfig, cluster_features

        model = self.model
        if not model.has_features:
            raise ValueError("labels from features need a model with a feature field (feature_dim > 0)")
        labels, confidence = cluster_features(model.selection_features(), config or FeatureClusteringConfig())
        model.set_instances(labels, confidence)
        CONSOLE.log(f"Feature clustering: {int(labels.max())} instances; {int((labels > 0).sum())}/{model.num_points} Gaussians labelled")
        return labels

    @torch.no_grad()
    def run_instance_tracing(self, step: Optional[int] = None):
        """Traces all training views, labels the Gaussians and installs consistent training maps.

        Returns the `ConsistentInstances` (maps, Gaussian labels and confidences, merge statistics).
        """
        from trace3d_ns.git.merging import consistent_instances, refine_maps
        from trace3d_ns.git.tracing import trace_model, view_contributions

        dm = self.datamanager
        patch_maps = dm.train_patch_maps()
        if not patch_maps:
            raise RuntimeError(
                "No patch maps: Gaussian Instance Tracing needs the datamanager set up for training "
                "(test_mode='val'), which computes or loads the masks."
            )
        model = self.model
        traces = trace_model(model, dm.train_dataset.cameras, patch_maps, self.config.trace)
        merge = self.config.merge
        alike = None
        if merge.alike_by_masks:
            alike = dm.train_patch_alike()
            missing = sum(a is None for a in alike)
            if missing:
                CONSOLE.print(
                    f"[yellow]{missing} of {len(alike)} patch maps came from a cache written without their masks' "
                    "alike matrices: those views compare patch ids (delete the patch cache to recompute them)"
                )
        result = consistent_instances(traces, patch_maps, merge, alike)
        model.set_instances(result.gaussian_labels, result.gaussian_confidence, traces)
        if merge.refine:  # split impure patches and fill unmasked pixels with the rendered labels
            cameras, g = dm.train_dataset.cameras, model.activated_gaussians()
            result.maps = refine_maps(
                result, patch_maps,
                lambda i: view_contributions(model, cameras, i, tuple(patch_maps[i].shape), g),
                min_purity=merge.refine_min_purity, fill_unmasked=merge.refine_fill_unmasked,
            )
        if self.config.use_consistent_labels:
            dm.set_train_instance_maps(result.maps)
        settings = {"step": step, "num_gaussians": model.num_points, "trace": asdict(self.config.trace), "merge": asdict(self.config.merge)}
        dm.save_train_maps(CONSISTENT_KIND, result.maps, settings)
        s = result.stats
        CONSOLE.log(
            f"Gaussian Instance Tracing: {s.num_patches} patches -> {s.num_instances} instances "
            f"({s.within_view_merges} merges within views, {s.cross_view_links} links across views); "
            f"{int((result.gaussian_labels > 0).sum())}/{model.num_points} Gaussians labelled"
        )
        return result
