"""Trace3DDataManager on a tiny nerfstudio-format scene built on the fly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

from trace3d_ns.data.datamanager import EmptyMasksWarning, Trace3DDataManager, Trace3DDataManagerConfig
from trace3d_ns.data.mask_cache import CACHE_DIRNAME
from trace3d_ns.data.mask_sources import MaskSource, SuperpixelMaskSourceConfig

torch.set_num_threads(1)

N_IMAGES = 6
SIZE = 32


def _image(i: int) -> np.ndarray:
    """A bright disc on a dark background plus noise; the disc moves with i."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img = np.full((SIZE, SIZE, 3), 30, dtype=np.uint8)
    disc = (yy - 16) ** 2 + (xx - 10 - 2 * i) ** 2 < 64
    img[disc] = (230, 60, 40)
    rng = np.random.default_rng(i)
    return np.clip(img.astype(int) + rng.integers(-8, 8, size=img.shape), 0, 255).astype(np.uint8)


def make_scene(root: Path, distortion: Optional[Dict[str, float]] = None) -> Path:
    (root / "images").mkdir(parents=True)
    frames = []
    for i in range(N_IMAGES):
        Image.fromarray(_image(i)).save(root / "images" / f"frame_{i:05d}.png")
        c2w = np.eye(4)
        c2w[:3, 3] = [0.2 * i - 0.5, 0.0, 3.0]  # OpenGL camera looking down -z at the origin
        frames.append({"file_path": f"images/frame_{i:05d}.png", "transform_matrix": c2w.tolist()})
    meta = {
        "camera_model": "OPENCV",
        "fl_x": 30.0,
        "fl_y": 30.0,
        "cx": 16.0,
        "cy": 16.0,
        "w": SIZE,
        "h": SIZE,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        **(distortion or {}),
        "frames": frames,
    }
    (root / "transforms.json").write_text(json.dumps(meta))
    return root


class CountingSource(MaskSource):
    """Superpixel masks, counting the images it was asked about."""

    def __init__(self):
        super().__init__(SuperpixelMaskSourceConfig(scales=(50.0, 400.0), min_size=5))
        self.inner = self.config.setup()
        self.calls = 0

    def __call__(self, image, image_path):
        self.calls += 1
        assert image.dtype == np.uint8 and image.shape[2] == 3
        return self.inner(image, image_path)


def _config(data: Path, **kw) -> Trace3DDataManagerConfig:
    kw.setdefault("mask_source", "superpixel")
    kw.setdefault("min_patch_area", 4)
    return Trace3DDataManagerConfig(
        dataparser=NerfstudioDataParserConfig(data=data, eval_mode="fraction", train_split_fraction=0.5), **kw
    )


def test_next_train_carries_patches_and_cache_is_reused(tmp_path):
    data = make_scene(tmp_path / "scene")
    source = CountingSource()
    dm = _config(data).setup(device="cpu", test_mode="val", mask_source=source)
    assert isinstance(dm, Trace3DDataManager)
    camera, batch = dm.next_train(0)
    assert "patches" in batch and "mask" not in batch
    patches = batch["patches"]
    assert patches.dtype == torch.int32 and patches.device.type == "cpu"
    assert tuple(patches.shape) == tuple(batch["image"].shape[:2]) == (SIZE, SIZE)
    assert int(patches.max()) >= 1
    n_train = len(dm.train_dataset)
    assert source.calls == n_train == 3
    maps = dm.train_patch_maps()
    assert len(maps) == n_train and torch.equal(maps[batch["image_idx"]], patches)
    names = dm.train_image_names()
    assert names == [f"images/{Path(p).name}" for p in dm.train_dataset.image_filenames]
    cache_files = list((data / CACHE_DIRNAME).glob("patches-*.npz"))
    assert len(cache_files) == 1

    # Patches follow the image: the disc is one patch that differs from the background corners.
    img_idx = batch["image_idx"]
    frame = int(Path(dm.train_dataset.image_filenames[img_idx]).stem.split("_")[1])
    disc_center = (16, 10 + 2 * frame)
    assert patches[disc_center] != patches[0, 0]

    # A second training run: loaded from the cache, nothing recomputed.
    source2 = CountingSource()
    dm2 = _config(data).setup(device="cpu", test_mode="val", mask_source=source2)
    maps2 = dm2.train_patch_maps()
    assert source2.calls == 0
    for a, b in zip(maps, maps2):
        assert torch.equal(a, b)
    # with each map, which of its patches one mask covers together (computed, then from the cache)
    alike, alike2 = dm.train_patch_alike(), dm2.train_patch_alike()
    for m, a, b in zip(maps, alike, alike2):
        assert a.shape == (int(m.max()) + 1,) * 2 and np.array_equal(a, b) and (np.diag(a)[1:] == 1).all()
    # and every training batch carries its image's matrix (for the contrastive loss), from either run
    for manager, matrices in ((dm, alike), (dm2, alike2)):
        _, served = manager.next_train(1)
        assert served["patch_alike"].dtype == torch.bool
        assert np.array_equal(served["patch_alike"].numpy(), matrices[served["image_idx"]] > 0)

    # Later stages can store their own per-image maps in the same cache.
    consistent = [m * 0 + 7 for m in maps]
    assert dm2.save_train_maps("consistent", consistent, {"threshold": 0.5}) is not None
    loaded = dm.load_train_maps("consistent", {"threshold": 0.5})
    assert loaded is not None and all(torch.equal(a, b) for a, b in zip(loaded, consistent))
    assert dm.load_train_maps("consistent", {"threshold": 0.4}) is None

    # A changed setting recomputes.
    source3 = CountingSource()
    _config(data, min_patch_area=5).setup(device="cpu", test_mode="val", mask_source=source3).train_patch_maps()
    assert source3.calls == n_train


@pytest.mark.parametrize("test_mode", ["test", "inference"])
def test_no_masks_outside_training(tmp_path, test_mode):
    data = make_scene(tmp_path / "scene")
    source = CountingSource()
    dm = _config(data).setup(device="cpu", test_mode=test_mode, mask_source=source)
    _, batch = dm.next_train(0)
    assert "patches" not in batch
    dm.next_eval(0)
    assert source.calls == 0
    assert not (data / CACHE_DIRNAME).exists()
    with pytest.raises(RuntimeError, match="test_mode"):
        dm.train_patch_maps()


def test_superpixel_source_from_config_and_cpu_cache_without_cuda(tmp_path):
    data = make_scene(tmp_path / "scene")
    # cache_images="cpu" makes nerfstudio call pin_memory(), which needs a CUDA driver.
    dm = _config(data, cache_images="cpu", cache_images_type="uint8", use_cache=False).setup(
        device="cpu", test_mode="val"
    )
    _, batch = dm.next_train(0)
    assert batch["image"].dtype == torch.uint8
    assert tuple(batch["patches"].shape) == (SIZE, SIZE)
    assert not (data / CACHE_DIRNAME).exists()  # use_cache=False


def test_levels_source_from_config_deals_levels_over_the_training_images(tmp_path, monkeypatch):
    from trace3d_ns.data.levels import LevelsMaskSource, LevelsMaskSourceConfig

    data = make_scene(tmp_path / "scene")
    prepared, levels = [], []
    prepare, segments = LevelsMaskSource.prepare, LevelsMaskSource.segments

    def spy_prepare(self, paths):
        prepared.append([Path(p) for p in paths])
        prepare(self, paths)

    def spy_segments(self, image, level):
        levels.append(level)
        return segments(self, image, level)

    monkeypatch.setattr(LevelsMaskSource, "prepare", spy_prepare)
    monkeypatch.setattr(LevelsMaskSource, "segments", spy_segments)
    cfg = LevelsMaskSourceConfig(scales=(20.0, 5000.0), reference_pixels=0, min_size=5)
    dm = _config(data, mask_source="levels", levels=cfg, use_cache=False).setup(device="cpu", test_mode="val")
    maps = dm.train_patch_maps()
    assert prepared == [[Path(p) for p in dm.train_dataset.image_filenames]]  # once, with the training images
    assert sorted(levels) == [0, 0, 1]  # 3 training images dealt out 2 : 1 (largest remainder to level 0)
    # A coarse view's patches are its few segments; a fine view's are more.
    counts = [int(m.max()) for m in maps]
    assert max(counts[i] for i, lv in enumerate(levels) if lv == 0) > min(counts[i] for i, lv in enumerate(levels) if lv == 1)


def test_folder_source_empty_masks_warn_and_train_on(tmp_path):
    data = make_scene(tmp_path / "scene")
    masks_dir = data / "masks"
    masks_dir.mkdir()
    for i in range(N_IMAGES):
        labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
        if i != 2:  # frame 2 (a training image) has no masks at all
            labels[_image(i)[..., 0] > 128] = 5
        Image.fromarray(labels).save(masks_dir / f"frame_{i:05d}.png")
    dm = _config(data, mask_source="folder").setup(device="cpu", test_mode="val")
    with pytest.warns(EmptyMasksWarning, match="frame_00002.png"):
        maps = dm.train_patch_maps()
    names = [Path(p).name for p in dm.train_dataset.image_filenames]
    empty = maps[names.index("frame_00002.png")]
    assert not empty.any()
    full = maps[names.index("frame_00000.png")]
    np.testing.assert_array_equal(full.numpy() > 0, _image(0)[..., 0] > 128)


def test_folder_source_missing_file_fails_naming_the_image(tmp_path):
    data = make_scene(tmp_path / "scene")
    (data / "masks").mkdir()
    np.save(data / "masks" / "frame_00000.npy", np.zeros((1, SIZE, SIZE), dtype=bool))
    dm = _config(data, mask_source="folder").setup(device="cpu", test_mode="val")
    with pytest.raises(Exception, match="frame_00002.png"):
        dm.train_patch_maps()


def test_folder_masks_are_undistorted_like_the_image(tmp_path):
    data = make_scene(tmp_path / "scene", distortion={"k1": -0.25, "k2": 0.05})
    masks_dir = data / "masks"
    masks_dir.mkdir()
    for i in range(N_IMAGES):
        labels = (_image(i)[..., 0] > 128).astype(np.uint8)  # the disc
        Image.fromarray(labels).save(masks_dir / f"frame_{i:05d}.png")
    dm = _config(data, mask_source="folder", min_patch_area=0).setup(device="cpu", test_mode="val")
    for idx in range(len(dm.train_dataset)):
        entry = dm.cached_train[idx]
        image, patches = entry["image"], entry["patches"]
        assert tuple(patches.shape) == tuple(image.shape[:2])
        assert tuple(image.shape[:2]) != (SIZE, SIZE)  # undistortion cropped the image
        # The undistorted disc in the image and in the patch map agree (bilinear vs nearest: edges only).
        disc_img = image.numpy()[..., 0] > 128 / 255.0
        agree = (disc_img == (patches.numpy() > 0)).mean()
        assert agree > 0.95, agree


def test_sam_source_through_the_datamanager(tmp_path):
    from trace3d_ns.data.mask_sources import SamMaskSource, SamMaskSourceConfig, build_tiny_random_sam

    data = make_scene(tmp_path / "scene")
    config = SamMaskSourceConfig(points_per_side=4, pred_iou_thresh=-1e9, stability_score_thresh=0.0)
    source = SamMaskSource(config, device="cpu", build_sam_model=build_tiny_random_sam)
    dm = _config(data, mask_source="sam").setup(device="cpu", test_mode="val", mask_source=source)
    maps = dm.train_patch_maps()
    assert len(maps) == 3
    for entry, patches in zip(dm.cached_train, maps):
        assert tuple(patches.shape) == tuple(entry["image"].shape[:2])
        assert patches.dtype == torch.int32


def test_missing_sam_checkpoint_fails_at_training_start_only(tmp_path):
    from trace3d_ns.data.mask_sources import SamCheckpointNotFoundError

    data = make_scene(tmp_path / "scene")
    # Construction (as in ns-viewer / ns-export) never needs the checkpoint ...
    dm = _config(data, mask_source="sam").setup(device="cpu", test_mode="test")
    dm.next_train(0)
    # ... training does, and says which file.
    dm = _config(data, mask_source="sam").setup(device="cpu", test_mode="val")
    with pytest.raises(SamCheckpointNotFoundError, match="sam_vit_h_4b8939.pth"):
        dm.next_train(0)
