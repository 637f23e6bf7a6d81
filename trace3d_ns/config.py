"""The `trace3d` method, registered through the `nerfstudio.method_configs` entry point.

Kept light: it imports config dataclasses only (torch and nerfstudio, which ns-train has loaded
anyway); SAM, scikit-image, scikit-learn, trimesh and Triton load lazily where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional, Type

from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification
from trace3d_ns.data.datamanager import Trace3DDataManagerConfig
from trace3d_ns.model import Trace3DModelConfig
from trace3d_ns.pipeline import Trace3DPipelineConfig
from trace3d_ns.schedulers import FloatExponentialDecaySchedulerConfig

if TYPE_CHECKING:
    import torch

MAX_STEPS = 30000


@dataclass
class Trace3DMachineConfig(MachineConfig):
    """nerfstudio's machine settings, with `auto` as the default device type."""

    device_type: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: cuda when torch sees a CUDA GPU, else cpu (with one warning); cuda without a GPU is an error."""


def _trainer_class() -> Type:
    from trace3d_ns.trainer import Trace3DTrainer

    return Trace3DTrainer


@dataclass
class Trace3DTrainerConfig(TrainerConfig):
    """TrainerConfig whose `machine.device_type` may be `auto`, resolved before anything reads it:
    by `save_config` (ns-train saves the config, then launches with its device type) and by `setup`
    (whatever builds the Trainer)."""

    _target: Type = field(default_factory=lambda: _trainer_class())
    """Trace3DTrainer: nerfstudio's Trainer, with resuming (`--load-dir`) that trains the loaded Gaussians."""
    machine: MachineConfig = field(default_factory=Trace3DMachineConfig)
    """Machine configuration (device type `auto` by default)."""

    def resolve_device(self) -> None:
        """Replace `auto` by the device this machine has (see `trace3d_ns.device.resolve_device_type`)."""
        from trace3d_ns.device import resolve_device_type

        self.machine.device_type = resolve_device_type(self.machine.device_type)

    def save_config(self) -> None:
        self.resolve_device()
        super().save_config()

    def setup(self, **kwargs):
        self.resolve_device()
        return super().setup(**kwargs)


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """Adam, fused into one kernel per parameter where torch has one (float parameters on the CPU or
    CUDA): per-op Adam launches about ten full passes over each parameter per step, which on the CPU
    costs more than the compiled rasterizer's whole backward pass."""

    fused: Optional[bool] = None
    """None: fused when every parameter allows it; True / False force the choice."""

    def setup(self, params) -> torch.optim.Optimizer:
        params = list(params)
        fused = self.fused
        if fused is None:
            tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
            fused = bool(tensors) and all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)
        kwargs = {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay}
        return self._target(params, fused=fused, **kwargs)


def _adam(lr: float, final: float | None = None, warmup: int = 0) -> dict:
    scheduler = None
    if final is not None:
        scheduler = FloatExponentialDecaySchedulerConfig(
            lr_final=final, max_steps=MAX_STEPS, warmup_steps=warmup, lr_pre_warmup=0 if warmup else 1e-8
        )
    return {"optimizer": FusedAdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}


def trace3d_trainer_config() -> TrainerConfig:
    """A fresh `TrainerConfig` for the trace3d method (splatfacto's schedule and learning rates; the
    device is the GPU when there is one, else the CPU)."""
    return Trace3DTrainerConfig(
        method_name="trace3d",
        machine=Trace3DMachineConfig(),
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
