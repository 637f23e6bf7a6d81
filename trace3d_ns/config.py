"""The `trace3d` method, registered through the `nerfstudio.method_configs` entry point.

Kept light: it imports config dataclasses only (torch and nerfstudio, which ns-train has loaded
anyway); SAM, scikit-image, scikit-learn, trimesh and Triton load lazily where they are used.
"""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification
from trace3d_ns.data.datamanager import Trace3DDataManagerConfig
from trace3d_ns.model import Trace3DModelConfig
from trace3d_ns.pipeline import Trace3DPipelineConfig
from trace3d_ns.schedulers import FloatExponentialDecaySchedulerConfig

MAX_STEPS = 30000


def _adam(lr: float, final: float | None = None, warmup: int = 0) -> dict:
    scheduler = None
    if final is not None:
        scheduler = FloatExponentialDecaySchedulerConfig(
            lr_final=final, max_steps=MAX_STEPS, warmup_steps=warmup, lr_pre_warmup=0 if warmup else 1e-8
        )
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}


def trace3d_trainer_config() -> TrainerConfig:
    """A fresh `TrainerConfig` for the trace3d method (splatfacto's schedule and learning rates)."""
    return TrainerConfig(
        method_name="trace3d",
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=MAX_STEPS,
        mixed_precision=False,
        pipeline=Trace3DPipelineConfig(
            datamanager=Trace3DDataManagerConfig(
                dataparser=NerfstudioDataParserConfig(load_3D_points=True),
                cache_images_type="uint8",
            ),
            model=Trace3DModelConfig(),
        ),
        optimizers={
            "means": _adam(1.6e-4, final=1.6e-6),
            "features_dc": _adam(0.0025),
            "features_rest": _adam(0.0025 / 20),
            "opacities": _adam(0.05),
            "scales": _adam(0.005),
            "quats": _adam(0.001),
            "features": _adam(0.005),
            "camera_opt": _adam(1e-4, final=5e-7, warmup=1000),
            "bilateral_grid": _adam(2e-3, final=1e-4, warmup=1000),
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


trace3d_method = MethodSpecification(
    config=trace3d_trainer_config(),
    description="Trace3D: SAM masks lifted to Gaussians by Gaussian Instance Tracing (CUDA via gsplat, or CPU)",
)
