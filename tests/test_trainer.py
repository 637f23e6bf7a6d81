"""Resuming from a checkpoint trains the loaded Gaussians: the optimizers are pointed at the
parameters the checkpoint load created, with the loaded optimizer state moved over."""

import torch
from torch.nn import Parameter

from nerfstudio.engine.optimizers import AdamOptimizerConfig

from trace3d_ns.config import trace3d_trainer_config
from trace3d_ns.trainer import Trace3DTrainer, rebind_optimizers


def _optimizers(groups):
    from nerfstudio.engine.optimizers import Optimizers

    config = {name: {"optimizer": AdamOptimizerConfig(lr=0.1), "scheduler": None} for name in groups}
    return Optimizers(config, groups)


def test_trace3d_runs_with_its_trainer():
    assert trace3d_trainer_config()._target is Trace3DTrainer


def test_rebind_moves_the_loaded_state_to_the_new_parameters():
    old = {"means": [Parameter(torch.zeros(2, 3))], "opacities": [Parameter(torch.zeros(2, 1))]}
    optimizers = _optimizers(old)
    # what a checkpoint load does: new, larger parameters in the model; optimizer state of their size
    new = {"means": [Parameter(torch.ones(5, 3))], "opacities": [Parameter(torch.ones(5, 1))]}
    saved = _optimizers(new)
    for params in new.values():
        params[0].grad = torch.ones_like(params[0])
    saved.optimizer_step_all()
    optimizers.load_optimizers({k: o.state_dict() for k, o in saved.optimizers.items()})
    assert rebind_optimizers(optimizers, new) == 2
    assert rebind_optimizers(optimizers, new) == 0  # already bound
    for name, (param,) in new.items():
        optimizer = optimizers.optimizers[name]
        assert optimizer.param_groups[0]["params"][0] is param and optimizers.parameters[name][0] is param
        state = optimizer.state[param]
        assert state["exp_avg"].shape == param.shape and float(state["step"]) == 1.0
        assert old[name][0] not in optimizer.state
        before = param.detach().clone()
        param.grad = torch.ones_like(param)
        optimizers.optimizer_step(name)
        assert not torch.equal(param.detach(), before) and float(optimizer.state[param]["step"]) == 2.0


def test_rebind_refuses_a_group_of_another_length():
    import pytest

    optimizers = _optimizers({"means": [Parameter(torch.zeros(2, 3))]})
    with pytest.raises(RuntimeError, match="holds 1 parameters"):
        rebind_optimizers(optimizers, {"means": [Parameter(torch.zeros(2, 3)), Parameter(torch.zeros(1))]})
