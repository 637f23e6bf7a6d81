"""`trace3d-bench foreground`'s code path on a tiny setting: a 48 px generated scene with foreground-only
ground truth, a few training steps, 3 and 16 prompt points, and the picture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trace3d_ns.benchmarks.foreground import (
    COLOURS,
    MODES,
    SCENES,
    ForegroundConfig,
    error_map,
    run_foreground_benchmark,
    summary,
    train_command,
)
from trace3d_ns.benchmarks.report import foreground_section

BIN = Path(sys.executable).parent


def test_error_map_colours_each_outcome():
    pred = np.array([[True, True], [False, False]])
    gt = np.array([[True, False], [True, False]])
    out = error_map(pred, gt)
    assert [tuple(out[0, 0]), tuple(out[0, 1]), tuple(out[1, 0]), tuple(out[1, 1])] == [
        COLOURS["hit"], COLOURS["false"], COLOURS["miss"], COLOURS["empty"]
    ]


def test_scenes_train_with_the_levels_source():
    for name, cfg in SCENES.items():
        cmd = train_command(Path("data"), Path("work"), cfg)
        assert cmd[cmd.index("--pipeline.datamanager.mask-source") + 1] == "levels", name
        assert cfg.points == [3, 16]


@pytest.fixture(scope="module")
def foreground_scene(tmp_path_factory) -> Path:
    """A generated 8-view 48 px scene whose ground truth is foreground only (gt_masks/, like DTU)."""
    root = tmp_path_factory.mktemp("fg") / "scene"
    subprocess.run([str(BIN / "trace3d-scene"), "--out", str(root), "--views", "8", "--size", "48"],
                   check=True, capture_output=True)
    (root / "gt_masks").mkdir()
    for path in sorted((root / "gt_instances").glob("*.png")):
        ids = np.asarray(Image.open(path))
        Image.fromarray(((ids > 0) * 255).astype(np.uint8)).save(root / "gt_masks" / path.name)
        path.unlink()
    (root / "gt_instances").rmdir()
    return root


@pytest.mark.slow
def test_foreground_benchmark_runs_3_and_16_points_and_draws_the_picture(foreground_scene, tmp_path):
    cfg = ForegroundConfig(
        experiment="tiny", steps=12, num_downscales=0, resolution_schedule=1000, warmup=2, stop_split_at=10, git_step=6,
        contrastive_samples=256, num_random=500, needs=["transforms.json", "gt_masks"],
    )
    picture = tmp_path / "docs" / "foreground_tiny.png"
    result = run_foreground_benchmark("tiny", tmp_path / "work", foreground_scene, cfg, picture=picture)
    assert result["trained"] and result["step"] == 11
    for n in (3, 16):
        runs = result[f"points_{n}"]
        assert list(runs) == list(MODES)
        for mode, run in runs.items():
            assert 0.0 <= run["miou"] <= 1.0 and 0.0 <= run["macc"] <= 1.0, mode
            assert len(run["prompts"]) <= n and set(run["per_view"]) == set(result["test_views"])
    # 3 points are the first 3 of the 16 (the same greedy spread over the reference view's foreground).
    three, sixteen = result["points_3"]["feature"]["prompts"], result["points_16"]["feature"]["prompts"]
    assert len(three) == 3 and three == sixteen[:3]
    assert len({(p["x"], p["y"]) for p in sixteen}) == len(sixteen)
    assert summary(result)["points_3"]["instance"]["miou"] == result["points_3"]["instance"]["miou"]

    # The picture: one row per mode with image, prediction, GT and error map, on a test view.
    assert result["picture"]["file"] == picture.name and result["picture"]["view"] in result["test_views"]
    with Image.open(picture) as im:
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert width >= 4 * 48 and height >= len(MODES) * 48
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert COLOURS["hit"] in colours  # something of the foreground was selected

    # The report renders both point counts and links the picture.
    result["picture"]["markdown_path"] = f"docs/{picture.name}"
    text = "\n".join(foreground_section(result))
    assert "3 points mIoU" in text and "16 points mIoU" in text and f"](docs/{picture.name})" in text
