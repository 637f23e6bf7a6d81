"""nerfstudio's Trainer, with resuming from a checkpoint that trains the loaded Gaussians.

nerfstudio builds the optimizers before it loads a checkpoint (``--load-dir`` /
``--load-checkpoint``), and splatfacto's ``load_state_dict`` replaces every per-Gaussian
``Parameter`` with a new one sized to the checkpoint. The optimizers then hold the discarded
parameters, with the checkpoint's Adam moments loaded onto them: the loaded Gaussians get gradients
but no optimizer steps them, and a resumed run trains nothing (measured with nerfstudio 1.1.5: the
means, scales and opacities of a run resumed for 6 steps equal the checkpoint's bit for bit).

:class:`Trace3DTrainer` points every optimizer at the model's current parameters after loading,
carrying the loaded state over (:func:`rebind_optimizers`), the way densification already swaps a
parameter under its optimizer.
"""

from __future__ import annotations

from typing import Dict, List

from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.engine.trainer import Trainer
from torch.nn import Parameter


def rebind_optimizers(optimizers: Optimizers, param_groups: Dict[str, List[Parameter]]) -> int:
    """Point each optimizer of ``optimizers`` at the parameters of ``param_groups`` (the pipeline's
    ``get_param_groups()``), moving each replaced parameter's optimizer state (Adam's moments and
    step) to its replacement. Groups must list as many parameters as the optimizer holds. Returns
    how many parameters were replaced."""
    replaced = 0
    for name, optimizer in optimizers.optimizers.items():
        if name not in param_groups:
            continue
        current = list(param_groups[name])
        held = [p for group in optimizer.param_groups for p in group["params"]]
        if len(held) != len(current):
            raise RuntimeError(
                f"optimizer {name!r} holds {len(held)} parameters, the model's group has {len(current)}"
            )
        it = iter(current)
        for group in optimizer.param_groups:
            for i, old in enumerate(group["params"]):
                new = next(it)
                if new is old:
                    continue
                if old in optimizer.state:
                    optimizer.state[new] = optimizer.state.pop(old)
                group["params"][i] = new
                replaced += 1
        optimizers.parameters[name] = current
    return replaced


class Trace3DTrainer(Trainer):
    """nerfstudio's Trainer whose optimizers step the Gaussians a checkpoint loaded."""

    def _load_checkpoint(self) -> None:
        super()._load_checkpoint()
        if self.config.load_dir is not None or self.config.load_checkpoint is not None:
            rebind_optimizers(self.optimizers, self.pipeline.get_param_groups())
