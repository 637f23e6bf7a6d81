"""Learning-rate schedules whose state holds plain Python floats.

nerfstudio's `ExponentialDecayScheduler` returns numpy scalars, which end up in the checkpoint's
optimizer and scheduler state; torch >= 2.6 loads checkpoints with `weights_only=True`, so
`ns-viewer` / `ns-export` then refuse them. This twin returns `float`, with the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

from torch.optim import Optimizer, lr_scheduler

from nerfstudio.engine.schedulers import ExponentialDecayScheduler, ExponentialDecaySchedulerConfig


@dataclass
class FloatExponentialDecaySchedulerConfig(ExponentialDecaySchedulerConfig):
    """`ExponentialDecaySchedulerConfig` whose multipliers are Python floats."""

    _target: Type = field(default_factory=lambda: FloatExponentialDecayScheduler)


class FloatExponentialDecayScheduler(ExponentialDecayScheduler):
    """Exponential decay with linear or cosine warm-up; checkpoint-safe (floats only)."""

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> lr_scheduler.LRScheduler:
        numpy_schedule = super().get_scheduler(optimizer, lr_init)
        multiplier = numpy_schedule.lr_lambdas[0]
        return lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda step: float(multiplier(step)))
