"""The sam2 mask source with a tiny random-weight SAM 2 written as a model config + checkpoint.

The model is the sam2 package's own SAM 2.1 tiny config, shrunk (128 px input, 8-channel Hiera,
32-d heads); its masks are meaningless, but every file, setting and cache path is the real one.
The sam2 extra is part of the test set-up (scripts/setup_env.sh), so nothing here is skipped.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trace3d_ns.data.mask_sources import (
    MaskSourceError,
    MissingModelFileError,
    MissingPackageError,
    as_rgb_uint8,
)
from trace3d_ns.data.patches import masks_to_patches
from trace3d_ns.data.sam2_source import (
    Sam2MaskSource,
    Sam2MaskSourceConfig,
    remove_small_regions,
    tiny_sam2_model_config,
    write_tiny_random_sam2,
)
from trace3d_ns.scene.generate import SceneSpec, generate_scene

torch.set_num_threads(1)
BIN = Path(sys.executable).parent
SCENE = SceneSpec(num_objects=3, num_views=6, image_size=48, seed=1, test_every=3, num_points=800)  # 4 train views


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model config, checkpoint seed 0, checkpoint seed 1) of the tiny random SAM 2."""
    root = tmp_path_factory.mktemp("sam2")
    config, ckpt0 = write_tiny_random_sam2(root, seed=0)
    _, ckpt1 = write_tiny_random_sam2(root, seed=1)
    return config, ckpt0, ckpt1


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return generate_scene(tmp_path_factory.mktemp("sam2scene") / "scene", SCENE)


def _config(model_config: Path, checkpoint: Path, **kw) -> Sam2MaskSourceConfig:
    # Random weights predict arbitrary IoUs / stabilities: keep every mask.
    kw = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, **kw}
    return Sam2MaskSourceConfig(model="tiny", model_config=model_config, checkpoint=checkpoint, **kw)


class GenerateSpy:
    """Counts SAM2AutomaticMaskGenerator.generate calls (the images it saw)."""

    def __init__(self, monkeypatch):
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        self.images = []
        original = SAM2AutomaticMaskGenerator.generate

        def generate(generator, image):
            self.images.append(image.copy())
            return original(generator, image)

        monkeypatch.setattr(SAM2AutomaticMaskGenerator, "generate", generate)


# ------------------------------------------------------------------------------------------------
# the source on its own
# ------------------------------------------------------------------------------------------------


def test_source_loads_the_checkpoint_and_applies_the_settings(tiny, monkeypatch):
    model_config, ckpt0, _ = tiny

    def no_network(*args, **kwargs):
        raise AssertionError("the sam2 source tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    spy = GenerateSpy(monkeypatch)
    config = _config(model_config, ckpt0, points_per_side=5, points_per_batch=7, multimask_output=False, device="cpu")
    source = config.setup(device="meta")  # config.device wins over the datamanager's device
    assert isinstance(source, Sam2MaskSource) and source.device == torch.device("cpu")
    rgb = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    masks = source(rgb, Path("a.png"))
    assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (40, 56) and masks.any()
    areas = masks.reshape(masks.shape[0], -1).sum(1)
    assert (np.diff(areas) <= 0).all()  # largest first
    # The package's generator got the RGB image unchanged, and a float [0, 1] image is the same image.
    np.testing.assert_array_equal(spy.images[0], rgb)
    np.testing.assert_array_equal(source(torch.from_numpy(rgb / 255.0).float(), Path("a.png")), masks)
    np.testing.assert_array_equal(spy.images[1], rgb)

    generator = source._generator
    assert generator.point_grids[0].shape == (25, 2) and generator.points_per_batch == 7
    assert generator.multimask_output is False and generator.min_mask_region_area == 0
    model = generator.predictor.model
    assert next(model.parameters()).device == torch.device("cpu")
    saved = torch.load(ckpt0, weights_only=True)["model"]
    state = model.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)  # the checkpoint's weights
    # The thresholds reach the generator's filters (predicted IoUs are sigmoids, < 1; random logits
    # are near 0, so a mask's stability, its IoU when binarised at +1 vs -1, is ~0).
    for thresholds in ({"pred_iou_thresh": 1.0}, {"stability_score_thresh": 1e-3}):
        strict = _config(model_config, ckpt0, points_per_side=5, multimask_output=False, **thresholds).setup()
        assert strict(rgb, Path("a.png")).shape[0] == 0, thresholds
    source.close()
    assert source._generator is None


def test_min_region_area_removes_holes_and_islands_then_duplicates():
    square = np.zeros((32, 32), dtype=bool)
    square[4:20, 4:20] = True
    holed = square.copy()
    holed[10:12, 10:12] = False  # 4-pixel hole
    holed[26:28, 26:28] = True  # 4-pixel island
    far = np.zeros((32, 32), dtype=bool)
    far[22:30, 2:10] = True  # 64 px, elsewhere
    masks = np.stack([holed, square, far])
    out = remove_small_regions(masks, min_area=10, nms_thresh=0.7)
    # holed becomes square (hole filled, island dropped) and is then a duplicate of square.
    assert out.shape == (2, 32, 32)
    assert sorted(int(m.sum()) for m in out) == [64, 256]
    assert any(np.array_equal(m, square) for m in out) and any(np.array_equal(m, far) for m in out)
    # With a smaller minimum area nothing changes.
    np.testing.assert_array_equal(remove_small_regions(masks, min_area=3, nms_thresh=0.7)[0], holed)


def test_cache_settings_stamp_the_files_by_content(tiny, tmp_path):
    model_config, ckpt0, ckpt1 = tiny
    base = _config(model_config, ckpt0).setup().cache_settings()
    assert base["checkpoint"] and base["model_config"] and base["checkpoint"] != str(ckpt0)
    moved = tmp_path / "renamed.pt"
    shutil.copy(ckpt0, moved)
    assert _config(model_config, moved).setup().cache_settings() == base  # same bytes, other place
    assert _config(model_config, ckpt1).setup().cache_settings() != base
    assert _config(model_config, ckpt0, device="cuda", points_per_batch=3).setup().cache_settings() == base
    for change in ({"points_per_side": 4}, {"pred_iou_thresh": 0.1}, {"stability_score_thresh": 0.1},
                   {"min_mask_region_area": 9}, {"multimask_output": False}):
        assert _config(model_config, ckpt0, **change).setup().cache_settings() != base, change


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_missing_checkpoint_is_one_paragraph_naming_the_file(tmp_path):
    for config, name in ((Sam2MaskSourceConfig(), "sam2.1_hiera_large.pt"),
                         (Sam2MaskSourceConfig(model="tiny", checkpoint=tmp_path / "nope.pt"), "sam2.1_hiera_tiny.pt")):
        source = config.setup()
        with pytest.raises(MissingModelFileError) as info:
            source.check_inputs([Path("a.png")])
        msg = str(info.value)
        assert "\n" not in msg and isinstance(info.value, FileNotFoundError)
        for needle in (name, "https://dl.fbaipublicfiles.com/segment_anything_2/092824/" + name,
                       "--pipeline.datamanager.sam2.checkpoint", "folder", "superpixel", "Nothing is downloaded"):
            assert needle in msg, needle
        with pytest.raises(MissingModelFileError):
            source(np.zeros((8, 8, 3), np.uint8), Path("a.png"))  # also when called directly
    assert str(tmp_path / "nope.pt") in msg


def test_missing_model_config_names_the_file(tiny, tmp_path):
    _, ckpt0, _ = tiny
    with pytest.raises(MissingModelFileError) as info:
        Sam2MaskSourceConfig(model_config=tmp_path / "absent.yaml", checkpoint=ckpt0).setup().check_inputs([])
    msg = str(info.value)
    assert "\n" not in msg
    for needle in ("absent.yaml", "--pipeline.datamanager.sam2.model-config", "configs/sam2.1/sam2.1_hiera_l.yaml",
                   "superpixel"):
        assert needle in msg, needle
    # A config name inside the package is found like sam2's own build_sam2 finds it.
    settings = Sam2MaskSourceConfig(model_config=Path("configs/sam2/sam2_hiera_s.yaml")).setup().cache_settings()
    assert settings["model_config"] is not None


def test_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sam2", None)  # as if not installed
    with pytest.raises(MissingPackageError) as info:
        Sam2MaskSourceConfig(checkpoint=Path("x.pt")).setup().check_inputs([Path("a.png")])
    msg = str(info.value)
    assert "pip install -e .[sam2]" in msg and "superpixel" in msg and "\n" not in msg
    assert isinstance(info.value, ImportError)


def test_checkpoint_that_does_not_fit_the_config_is_a_clear_error(tiny, tmp_path):
    from omegaconf import OmegaConf

    model_config, ckpt0, _ = tiny
    other = tmp_path / "wider.yaml"
    OmegaConf.save(tiny_sam2_model_config(dim=16), other)
    with pytest.raises(MaskSourceError, match=r"does not fit the model config .*wider\.yaml.*sam2\.1_hiera_tiny\.pt"):
        _config(other, ckpt0).setup()(np.zeros((8, 8, 3), np.uint8), Path("a.png"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MaskSourceError, match=r"Could not read SAM 2 checkpoint .*junk\.pt"):
        _config(model_config, junk).setup()(np.zeros((8, 8, 3), np.uint8), Path("a.png"))


# ------------------------------------------------------------------------------------------------
# through the datamanager, on a generated scene
# ------------------------------------------------------------------------------------------------


def _datamanager(scene: Path, cache_dir: Path, source: Sam2MaskSourceConfig, test_mode: str = "val"):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from trace3d_ns.data.datamanager import Trace3DDataManagerConfig

    config = Trace3DDataManagerConfig(
        dataparser=NerfstudioDataParserConfig(data=scene),
        mask_source="sam2",
        sam2=source,
        min_patch_area=0,
        cache_dir=cache_dir,
    )
    return config.setup(device="cpu", test_mode=test_mode)


def test_datamanager_computes_caches_and_invalidates(scene, tiny, tmp_path, monkeypatch):
    model_config, ckpt0, ckpt1 = tiny
    cache = tmp_path / "cache"
    checkpoint = tmp_path / "sam2.1_hiera_tiny.pt"
    shutil.copy(ckpt0, checkpoint)
    spy = GenerateSpy(monkeypatch)

    dm = _datamanager(scene, cache, _config(model_config, checkpoint))
    maps = dm.train_patch_maps()
    n = len(maps)
    assert n == 4 and len(spy.images) == n and len(list(cache.glob("patches-*.npz"))) == 1
    assert all(m.dtype == torch.int32 for m in maps) and any(bool((m > 0).any()) for m in maps)
    # The maps are the sam2 source's masks on the training images, made disjoint.
    direct = _config(model_config, checkpoint).setup(device="cpu")
    for entry, patches, path in zip(dm.cached_train, maps, dm.train_dataset.image_filenames):
        rgb = as_rgb_uint8(entry["image"])
        assert tuple(patches.shape) == rgb.shape[:2]
        np.testing.assert_array_equal(patches.numpy(), masks_to_patches(direct(rgb, Path(path)), 0, "merge"))
    calls = len(spy.images)

    # Hit: same settings; speed and placement knobs do not count.
    again = _datamanager(scene, cache, _config(model_config, checkpoint, points_per_batch=5, device="cpu"))
    assert all(torch.equal(a, b) for a, b in zip(again.train_patch_maps(), maps)) and len(spy.images) == calls

    # Miss: a generator setting changed.
    _datamanager(scene, cache, _config(model_config, checkpoint, points_per_side=4)).train_patch_maps()
    assert len(spy.images) == calls + n and len(list(cache.glob("patches-*.npz"))) == 2
    calls = len(spy.images)

    # Miss: other weights under the same name and size (a content stamp, not the file's name or size).
    assert ckpt1.stat().st_size == checkpoint.stat().st_size
    shutil.copy(ckpt1, checkpoint)
    changed = _datamanager(scene, cache, _config(model_config, checkpoint)).train_patch_maps()
    assert len(spy.images) == calls + n and len(list(cache.glob("patches-*.npz"))) == 3
    assert any(not torch.equal(a, b) for a, b in zip(changed, maps))

    # ns-viewer / ns-export set-ups never run SAM 2, and a missing checkpoint only stops training.
    _datamanager(scene, cache, Sam2MaskSourceConfig(), test_mode="test").next_train(0)
    with pytest.raises(MissingModelFileError, match="sam2.1_hiera_large.pt"):
        _datamanager(scene, tmp_path / "empty", Sam2MaskSourceConfig()).next_train(0)


@pytest.mark.slow
def test_ns_train_with_the_sam2_source(scene, tiny, tmp_path):
    model_config, ckpt0, _ = tiny
    cache = tmp_path / "cache"
    out = subprocess.run(
        [
            str(BIN / "ns-train"), "trace3d", "--data", str(scene), "--output-dir", str(tmp_path / "outputs"),
            "--experiment-name", "sam2", "--timestamp", "run", "--machine.device-type", "cpu", "--vis", "tensorboard",
            "--max-num-iterations", "4", "--steps-per-save", "4", "--pipeline.model.num-downscales", "0",
            "--pipeline.git-step", "2", "--pipeline.model.feature-start-step", "2",
            "--pipeline.datamanager.cache-dir", str(cache), "--pipeline.datamanager.min-patch-area", "0",
            "--pipeline.datamanager.mask-source", "sam2",
            "--pipeline.datamanager.sam2.model", "tiny",
            "--pipeline.datamanager.sam2.model-config", str(model_config),
            "--pipeline.datamanager.sam2.checkpoint", str(ckpt0),
            "--pipeline.datamanager.sam2.points-per-side", "3",
            "--pipeline.datamanager.sam2.pred-iou-thresh", "0",
            "--pipeline.datamanager.sam2.stability-score-thresh", "0",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, f"ns-train failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    run = tmp_path / "outputs" / "sam2" / "trace3d" / "run"
    assert (run / "nerfstudio_models" / "step-000000003.ckpt").is_file()
    assert "mask_source: sam2" in (run / "config.yml").read_text()
    assert len(list(cache.glob("patches-*.npz"))) == 1  # the sam2 patch maps
    assert len(list(cache.glob("consistent-*.npz"))) == 1  # GIT ran on them at step 2
