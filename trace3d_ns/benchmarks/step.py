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
from typing import Dict, Optional

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


def _time_steps(trainer, steps: int, warmup: int) -> float:
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        for callback in trainer.callbacks:
            callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        trainer.train_iteration(step)
        for callback in trainer.callbacks:
            callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_step_benchmark(
    work: Optional[Path] = None, gaussians: int = 40000, size: int = 128, steps: int = 15, warmup: int = 3
) -> Dict:
    """Median step seconds per backend, with and without the feature field."""
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
        step_s: Dict[str, Dict[str, float]] = {}
        num_gaussians = {}
        for backend in BACKENDS:
            step_s[backend] = {}
            for features in (False, True):
                torch.manual_seed(0)
                trainer = _trainer(scene, root / "outputs", backend, features)
                key = "features" if features else "rgb"
                step_s[backend][key] = _time_steps(trainer, steps, warmup)
                num_gaussians[key] = trainer.pipeline.model.num_points
                del trainer
    compiled, reference = step_s["compiled"], step_s["torch"]
    return {
        "num_gaussians": num_gaussians["rgb"],
        "width": size,
        "height": size,
        "torch_threads": torch.get_num_threads(),
        "timed_steps": steps,
        "step_s": step_s,
        "speedup_compiled_vs_torch": reference["rgb"] / compiled["rgb"],
        "speedup_compiled_vs_torch_features": reference["features"] / compiled["features"],
        "feature_step_over_rgb_step": compiled["features"] / compiled["rgb"],
    }
