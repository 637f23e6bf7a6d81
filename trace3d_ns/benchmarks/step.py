"""Training-step benchmark: seconds of one full `ns-train trace3d` step on the CPU, per backend.

A step is what nerfstudio's trainer does per iteration: the callbacks before it, the render, the
losses (L1 + SSIM, and the contrastive loss when the feature field is on), backward, the
optimizer steps, and the callbacks after it (gsplat's strategy). The scene is a generated
128 px scene with SAM-like masks; the model starts from its ~40k seed points (surface samples),
and the timed steps come before densification starts, so every step sees the same Gaussians.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Hashable, List, Optional

BACKENDS = ("compiled", "torch")


def _trainer(scene: Path, out: Path, backend: str, features: bool):
    from trace3d_ns.config import trace3d_method

    cfg = copy.deepcopy(trace3d_method.config)
    cfg.data = scene
    cfg.pipeline.datamanager.data = scene  # as ns-train does with --data
    cfg.output_dir = out
    cfg.experiment_name = f"step_{backend}_{'features' if features else 'rgb'}"
    cfg.vis = "tensorboard"
    cfg.machine.device_type = "cpu"
    cfg.max_num_iterations = 10**6
    cfg.steps_per_save = 10**6
    cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 10**6
    cfg.pipeline.git_step = 10**6
    cfg.pipeline.datamanager.mask_source = "folder"
    cfg.pipeline.datamanager.folder.directory = Path("sam_masks")
    cfg.pipeline.datamanager.cache_dir = out / "cache"
    model = cfg.pipeline.model
    model.rasterizer = backend
    model.num_downscales = 0
    model.feature_start_step = 0 if features else 10**9
    model.warmup_length = 10**6  # no densification while timing: every step has the same Gaussians
    cfg.set_timestamp()
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def _step_seconds(trainer, step: int) -> float:
    """Wall seconds of one step as the trainer's loop runs it (callbacks around `train_iteration`)."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    start = time.perf_counter()
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    trainer.train_iteration(step)
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
    return time.perf_counter() - start


def _time_interleaved(trainers: Dict[Hashable, Any], steps: int, warmup: int) -> Dict[Hashable, float]:
    """Median step seconds of each trainer, stepping them in turn (one step each, round robin).
    On a shared or throttled machine the speed drifts by tens of percent over a minute: timed one
    after the other, two variants of the same code measured 1.2x apart; in turn, every variant
    sees the same drift and the ratios hold."""
    times: Dict[Hashable, List[float]] = {key: [] for key in trainers}
    for step in range(warmup + steps):
        for key, trainer in trainers.items():
            seconds = _step_seconds(trainer, step)
            if step >= warmup:
                times[key].append(seconds)
    return {key: statistics.median(t) for key, t in times.items()}


def run_step_benchmark(
    work: Optional[Path] = None, gaussians: int = 40000, size: int = 128, steps: int = 15, warmup: int = 3
) -> Dict:
    """Median step seconds per backend, with and without the feature field (the four trainers
    stepped in turn, see `_time_interleaved`)."""
    import torch

    from trace3d_ns.scene.generate import SceneSpec, generate_scene

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work) if work is not None else Path(tmp)
        scene = root / "scene"
        if not (scene / "transforms.json").exists():
            generate_scene(
                scene, SceneSpec(num_views=24, image_size=size, seed=0, num_points=gaussians, sam_like_masks=True),
                overwrite=True,
            )
        trainers = {}
        for backend in BACKENDS:
            for features in (False, True):
                torch.manual_seed(0)
                trainers[(backend, "features" if features else "rgb")] = _trainer(scene, root / "outputs", backend, features)
        num_gaussians = trainers[("compiled", "rgb")].pipeline.model.num_points
        medians = _time_interleaved(trainers, steps, warmup)
        del trainers
    step_s: Dict[str, Dict[str, float]] = {b: {k: medians[(b, k)] for k in ("rgb", "features")} for b in BACKENDS}
    compiled, reference = step_s["compiled"], step_s["torch"]
    return {
        "num_gaussians": num_gaussians,
        "width": size,
        "height": size,
        "torch_threads": torch.get_num_threads(),
        "timed_steps": steps,
        "timing": "the four trainers stepped in turn; median per trainer",
        "step_s": step_s,
        "speedup_compiled_vs_torch": reference["rgb"] / compiled["rgb"],
        "speedup_compiled_vs_torch_features": reference["features"] / compiled["features"],
        "feature_step_over_rgb_step": compiled["features"] / compiled["rgb"],
    }
