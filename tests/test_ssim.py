"""The compiled SSIM loss against pytorch_msssim (the reference splatfacto uses), values and gradients."""

import pytest
import torch
from pytorch_msssim import SSIM as ReferenceSSIM

from trace3d_ns.cuda.ssim import SSIM


def _images(shape, seed):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(shape, generator=g)
    pred = (gt + 0.15 * torch.randn(shape, generator=g)).clamp(0.0, 1.0)
    return gt, pred


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (1, 3, 37, 61), (2, 3, 11, 11), (1, 1, 12, 30)])
@pytest.mark.parametrize("grads", ["second", "first", "both"])
def test_compiled_ssim_matches_pytorch_msssim_with_gradients(shape, grads):
    gt, pred = _images(shape, seed=sum(shape))
    results = {}
    for name, module in (("reference", ReferenceSSIM(data_range=1.0, channel=shape[1])), ("compiled", SSIM(1.0, channel=shape[1]))):
        x = gt.clone().requires_grad_(grads in ("first", "both"))
        y = pred.clone().requires_grad_(grads in ("second", "both"))
        value = module(x, y)
        (1.0 - value).backward()  # as splatfacto's loss uses it
        results[name] = (value.detach(), x.grad, y.grad)
    assert SSIM(1.0, channel=shape[1]).compiled_applies(gt, pred)
    ref, ours = results["reference"], results["compiled"]
    assert ours[0].shape == ref[0].shape == ()
    assert torch.allclose(ours[0], ref[0], atol=1e-6), (ours[0], ref[0])
    for got, want in zip(ours[1:], ref[1:]):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


def test_identical_images_give_one_and_the_gradient_vanishes():
    gt, _ = _images((1, 3, 40, 40), seed=3)
    y = gt.clone().requires_grad_(True)
    value = SSIM(1.0)(gt, y)
    value.backward()
    assert value.item() == pytest.approx(1.0, abs=1e-6)
    assert y.grad.abs().max().item() < 1e-6


def test_what_the_kernels_do_not_take_goes_to_the_reference():
    ssim = SSIM(1.0)
    small, small_pred = _images((1, 3, 9, 40), seed=4)  # shorter than the window: pytorch_msssim skips that axis
    wide, wide_pred = (t.double() for t in _images((1, 3, 20, 20), seed=5))
    for x, y in ((small, small_pred), (wide, wide_pred)):
        assert not ssim.compiled_applies(x, y)
        with pytest.warns(UserWarning) if x.shape[-2] < 11 else _no_warning():
            got = ssim(x, y)
        with pytest.warns(UserWarning) if x.shape[-2] < 11 else _no_warning():
            want = ReferenceSSIM(data_range=1.0, channel=3)(x, y)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="odd"):
        SSIM(1.0, win_size=10)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("rasterizer", ["compiled", "torch"])
def test_the_model_takes_the_compiled_ssim_with_the_compiled_backend(rasterizer):
    from nerfstudio.data.scene_box import SceneBox
    from trace3d_ns.model import Trace3DModelConfig

    model = Trace3DModelConfig(num_random=10, rasterizer=rasterizer).setup(
        scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=1, seed_points=None,
        device="cpu",
    )
    assert isinstance(model.ssim, SSIM if rasterizer == "compiled" else ReferenceSSIM)
    assert not any(k.startswith("ssim") for k in model.state_dict())  # checkpoints do not change
    gt, pred = _images((1, 3, 24, 24), seed=6)
    assert torch.allclose(model.ssim(gt, pred), ReferenceSSIM(data_range=1.0, channel=3)(gt, pred), atol=1e-6)
