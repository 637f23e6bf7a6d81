"""Mask sources: sam (with a tiny random-weight SAM), folder, superpixel."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trace3d_ns.data.mask_sources import (
    FolderMaskSource,
    FolderMaskSourceConfig,
    MaskSourceError,
    SamCheckpointNotFoundError,
    SamMaskSource,
    SamMaskSourceConfig,
    SuperpixelMaskSource,
    SuperpixelMaskSourceConfig,
    build_tiny_random_sam,
    make_mask_source,
)

torch.set_num_threads(1)


def tiny_sam(config: SamMaskSourceConfig) -> torch.nn.Module:
    """A random-weight SAM built from segment_anything.modeling: 128 px, 32-d, depth-1 encoder."""
    return build_tiny_random_sam(config, img_size=128, dim=32)


def _tiny_sam_config(**kw) -> SamMaskSourceConfig:
    # Random weights predict arbitrary IoUs: accept every mask so that the pipeline produces output.
    return SamMaskSourceConfig(
        points_per_side=4, pred_iou_thresh=-1e9, stability_score_thresh=0.0, device="cpu", **kw
    )


def _image(h=48, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, : w // 2] = (200, 30, 30)
    img[:, w // 2 :] = (20, 40, 220)
    img += rng.integers(0, 20, size=img.shape, dtype=np.uint8)
    return img


# ------------------------------------------------------------------------------------------------
# sam
# ------------------------------------------------------------------------------------------------


def test_sam_source_end_to_end_with_injected_model(monkeypatch):
    from segment_anything import SamAutomaticMaskGenerator

    seen = []
    original = SamAutomaticMaskGenerator.generate

    def spy(self, image):
        seen.append(image.copy())
        return original(self, image)

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", spy)
    calls = []

    def factory(cfg):
        calls.append(cfg)
        return tiny_sam(cfg)

    source = _tiny_sam_config().setup(device="cpu", build_sam_model=factory)
    assert isinstance(source, SamMaskSource)
    img = _image()
    masks = source(img, Path("a.png"))
    assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (48, 64)
    assert masks.shape[0] >= 1 and masks.any()
    # SAM got the RGB image unchanged (not BGR), as uint8 HWC.
    assert len(seen) == 1 and seen[0].dtype == np.uint8
    np.testing.assert_array_equal(seen[0], img)
    # A float image in [0, 1] (nerfstudio's cache type) is converted back to the same uint8 RGB.
    source(torch.from_numpy(img.astype(np.float32) / 255.0), Path("a.png"))
    np.testing.assert_array_equal(seen[1], img)
    assert len(calls) == 1  # the model is built once and reused
    # Deterministic: masks ordered by area, largest first.
    areas = masks.reshape(masks.shape[0], -1).sum(1)
    assert (np.diff(areas) <= 0).all()
    source.close()


def test_sam_missing_checkpoint_is_one_clear_paragraph(tmp_path):
    source = SamMaskSourceConfig().setup(device="cpu")
    with pytest.raises(SamCheckpointNotFoundError) as info:
        source(_image(), Path("a.png"))
    msg = str(info.value)
    assert "\n" not in msg
    for needle in ("sam_vit_h_4b8939.pth", "segment-anything", "--pipeline.datamanager.sam.checkpoint", "folder", "superpixel"):
        assert needle in msg, needle
    assert isinstance(info.value, FileNotFoundError)

    missing = tmp_path / "nope" / "sam_vit_b.pth"
    source = SamMaskSourceConfig(model_type="vit_b", checkpoint=missing).setup(device="cpu")
    with pytest.raises(SamCheckpointNotFoundError, match="sam_vit_b_01ec64.pth") as info:
        source.check_inputs([Path("a.png")])
    assert str(missing) in str(info.value)


def test_sam_and_sam2_checkpoint_errors_before_importing_anything_heavy():
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from trace3d_ns.data.mask_sources import SamMaskSourceConfig, SamCheckpointNotFoundError\n"
        "from trace3d_ns.data.datamanager import Trace3DDataManagerConfig\n"
        "assert 'segment_anything' not in sys.modules and 'skimage' not in sys.modules\n"
        "try:\n"
        "    SamMaskSourceConfig().setup().check_inputs([Path('a.png')])\n"
        "except SamCheckpointNotFoundError:\n"
        "    pass\n"
        "assert 'segment_anything' not in sys.modules\n"
        "from trace3d_ns.data.sam2_source import Sam2MaskSourceConfig\n"
        "from trace3d_ns.data.mask_sources import MissingModelFileError\n"
        "try:\n"
        "    Sam2MaskSourceConfig().setup().check_inputs([Path('a.png')])\n"
        "except MissingModelFileError:\n"
        "    pass\n"
        "assert not {'sam2', 'hydra', 'omegaconf'} & set(sys.modules), 'sam2 imported before it is needed'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_sam_checkpoint_is_stamped_by_content(tmp_path):
    a, b, moved = tmp_path / "a" / "sam_vit_b_01ec64.pth", tmp_path / "b" / "sam_vit_b_01ec64.pth", tmp_path / "x.pth"
    for path, payload in ((a, b"weights-1"), (b, b"weights-2"), (moved, b"weights-1")):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(payload)
    stamp = {p: SamMaskSourceConfig(checkpoint=p).setup().cache_settings()["checkpoint"] for p in (a, b, moved)}
    assert stamp[a] == stamp[moved] != stamp[b]  # same name and size, other weights: another key
    assert SamMaskSourceConfig(checkpoint=tmp_path / "none.pth").setup().cache_settings()["checkpoint"] is None


def test_sam_cache_settings_ignore_speed_knobs():
    a = SamMaskSourceConfig(device="cpu", points_per_batch=16).cache_settings()
    b = SamMaskSourceConfig(device="cuda", points_per_batch=64).cache_settings()
    c = SamMaskSourceConfig(pred_iou_thresh=0.5).cache_settings()
    assert a == b and a != c
    assert "device" not in a and a["stability_score_thresh"] == 0.9


# ------------------------------------------------------------------------------------------------
# folder
# ------------------------------------------------------------------------------------------------


def test_folder_npy_and_png_label_maps(tmp_path):
    d = tmp_path / "masks"
    d.mkdir()
    stack = np.zeros((3, 10, 12), dtype=bool)
    stack[0, :5] = True
    stack[1, :, :6] = True
    stack[2, 8:, 10:] = True
    np.save(d / "frame_000.npy", stack)
    labels8 = np.zeros((10, 12), dtype=np.uint8)
    labels8[2:4, 2:4] = 3
    labels8[6:, 6:] = 7
    Image.fromarray(labels8).save(d / "frame_001.png")
    labels16 = np.zeros((10, 12), dtype=np.uint16)
    labels16[:, :3] = 1000
    labels16[:, 3:5] = 40000
    Image.fromarray(labels16).save(d / "frame_002.png")

    source = FolderMaskSourceConfig(directory=Path("masks")).setup(data_dir=tmp_path)
    assert isinstance(source, FolderMaskSource)
    paths = [tmp_path / "images" / f"frame_00{i}.jpg" for i in range(3)]
    source.check_inputs(paths)
    img = np.zeros((10, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(source(img, paths[0]), stack)
    m1 = source(img, paths[1])
    assert m1.shape == (2, 10, 12)
    np.testing.assert_array_equal(m1[0], labels8 == 3)
    np.testing.assert_array_equal(m1[1], labels8 == 7)
    m2 = source(img, paths[2])
    assert m2.shape == (2, 10, 12) and m2[1].sum() == 20 and m2[0].sum() == 30
    assert source.input_stamp(paths[0]) != source.input_stamp(paths[1]) != ""


def test_folder_errors_name_the_image(tmp_path):
    d = tmp_path / "masks"
    d.mkdir()
    np.save(d / "good.npy", np.zeros((1, 10, 12), dtype=bool))
    np.save(d / "small.npy", np.zeros((1, 5, 6), dtype=bool))
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(d / "rgb.png")
    source = FolderMaskSourceConfig(directory=d).setup()
    img = np.zeros((10, 12, 3), dtype=np.uint8)

    with pytest.raises(MaskSourceError, match=r"missing_one\.png|missing_two\.png") as info:
        source.check_inputs([Path("good.png"), Path("missing_one.png"), Path("missing_two.png")])
    assert "2 of 3" in str(info.value) and "missing_one.png" in str(info.value)
    with pytest.raises(MaskSourceError, match=r"missing_one\.png"):
        source(img, Path("x/missing_one.png"))
    with pytest.raises(MaskSourceError, match=r"'small\.jpg'.*5x6.*10x12"):
        source(img, Path("small.jpg"))
    with pytest.raises(MaskSourceError, match=r"rgb\.png"):
        source(img, Path("rgb.png"))
    with pytest.raises(MaskSourceError, match="does not exist"):
        FolderMaskSourceConfig(directory=tmp_path / "absent").setup().check_inputs([Path("good.png")])


# ------------------------------------------------------------------------------------------------
# superpixel
# ------------------------------------------------------------------------------------------------


def test_superpixel_masks_overlap_at_every_scale():
    source = SuperpixelMaskSourceConfig(scales=(50.0, 400.0, 2000.0)).setup()
    assert isinstance(source, SuperpixelMaskSource)
    rng = np.random.default_rng(0)
    img = np.zeros((64, 80, 3), dtype=np.uint8)
    img[:32] = (250, 0, 0)
    img[32:, :40] = (0, 250, 0)
    img[32:, 40:] = (0, 0, 250)
    img = np.clip(img.astype(int) + rng.integers(-30, 30, size=img.shape), 0, 255).astype(np.uint8)
    masks = source(img, Path("a.png"))
    assert masks.dtype == bool and masks.shape[1:] == (64, 80)
    # Each scale is a partition: every pixel is covered by exactly one mask per scale.
    np.testing.assert_array_equal(masks.sum(0), 3)
    assert masks.shape[0] > 3


def test_superpixel_is_fast_enough():
    source = SuperpixelMaskSourceConfig().setup()
    img = _image(256, 256)
    source(img, Path("warmup.png"))
    t0 = time.perf_counter()
    source(img, Path("a.png"))
    assert time.perf_counter() - t0 < 1.5  # ~0.15 s measured; generous for loaded machines


def test_make_mask_source_selects_by_name(tmp_path):
    from trace3d_ns.data.sam2_source import Sam2MaskSource, Sam2MaskSourceConfig

    configs = {"sam": SamMaskSourceConfig(), "sam2": Sam2MaskSourceConfig(), "folder": FolderMaskSourceConfig(),
               "superpixel": SuperpixelMaskSourceConfig()}
    assert isinstance(make_mask_source("superpixel", configs, device="cpu", data_dir=tmp_path), SuperpixelMaskSource)
    assert isinstance(make_mask_source("sam2", configs, device="cpu", data_dir=tmp_path), Sam2MaskSource)
    folder = make_mask_source("folder", configs, device="cpu", data_dir=tmp_path)
    assert isinstance(folder, FolderMaskSource) and folder.directory == tmp_path / "masks"
    assert isinstance(make_mask_source("sam", configs, device="cpu", data_dir=tmp_path), SamMaskSource)
    with pytest.raises(ValueError):
        make_mask_source("nope", configs)  # type: ignore[arg-type]
