"""A user's path on a generated scene: trace3d-scene -> ns-train trace3d (CPU) -> ns-export."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    scene = root / "scene"
    _run(
        BIN / "trace3d-scene", "--out", scene, "--views", "10", "--size", "48", "--objects", "3", "--points", "1500",
        "--sam-like-masks", cwd=root,
    )
    _run(
        BIN / "ns-train", "trace3d", "--data", scene, "--output-dir", root / "outputs", "--experiment-name", "e2e",
        "--timestamp", "run", "--machine.device-type", "cpu", "--vis", "tensorboard",
        "--max-num-iterations", "40", "--steps-per-save", "40", "--pipeline.model.num-downscales", "0",
        "--pipeline.git-step", "30", "--pipeline.model.feature-start-step", "30",
        "--pipeline.datamanager.mask-source", "folder", "--pipeline.datamanager.folder.directory", "sam_masks", cwd=root,
    )
    return root, root / "outputs" / "e2e" / "trace3d" / "run"


@pytest.mark.slow
def test_ns_train_writes_a_checkpoint_and_patches(trained):
    root, run = trained
    ckpts = sorted((run / "nerfstudio_models").glob("step-*.ckpt"))
    assert ckpts and ckpts[-1].name == "step-000000039.ckpt"
    assert (run / "config.yml").is_file()
    cache = root / "scene" / ".trace3d_cache"
    assert len(list(cache.glob("patches-*.npz"))) == 1  # patch maps from the folder masks
    assert len(list(cache.glob("consistent-*.npz"))) == 1  # consistent maps from GIT at step 30


@pytest.mark.slow
def test_checkpoint_carries_instance_labels_and_features(trained):
    import torch

    _, run = trained
    state = torch.load(sorted((run / "nerfstudio_models").glob("*.ckpt"))[-1], weights_only=True)["pipeline"]
    n = state["_model.gauss_params.means"].shape[0]
    assert state["_model.gauss_params.features"].shape == (n, 16)
    labels = state["_model.instance_labels"]
    assert labels.shape == (n,) and (labels > 0).any()  # labels followed densification to the end


@pytest.mark.slow
def test_resumed_training_trains_the_loaded_gaussians(trained):
    """`ns-train --load-dir` continues where the checkpoint ends, and its optimizers step the loaded
    Gaussians (nerfstudio's own Trainer left them unchanged)."""
    import torch

    root, run = trained
    _run(
        BIN / "ns-train", "trace3d", "--data", root / "scene", "--output-dir", root / "outputs", "--experiment-name", "e2e",
        "--timestamp", "resumed", "--machine.device-type", "cpu", "--vis", "tensorboard",
        "--max-num-iterations", "3", "--steps-per-save", "100", "--pipeline.model.num-downscales", "0",
        "--pipeline.git-step", "30", "--pipeline.model.feature-start-step", "30",
        "--pipeline.datamanager.mask-source", "folder", "--pipeline.datamanager.folder.directory", "sam_masks",
        "--load-dir", run / "nerfstudio_models", cwd=root,
    )
    load = lambda p: torch.load(p, weights_only=True)
    before = load(run / "nerfstudio_models" / "step-000000039.ckpt")
    after = load(run.parent / "resumed" / "nerfstudio_models" / "step-000000042.ckpt")
    for name in ("means", "scales", "opacities", "features_dc", "features"):
        key = f"_model.gauss_params.{name}"
        assert after["pipeline"][key].shape == before["pipeline"][key].shape
        assert not torch.equal(after["pipeline"][key], before["pipeline"][key]), name
    assert float(after["optimizers"]["means"]["state"][0]["step"]) == float(before["optimizers"]["means"]["state"][0]["step"]) + 3
    assert torch.equal(after["pipeline"]["_model.instance_labels"], before["pipeline"]["_model.instance_labels"])


@pytest.mark.slow
def test_ns_export_loads_the_checkpoint(trained):
    import torch
    from plyfile import PlyData

    root, run = trained
    _run(BIN / "ns-export", "gaussian-splat", "--load-config", run / "config.yml", "--output-dir", root / "export", cwd=root)
    ply = PlyData.read(str(root / "export" / "splat.ply"))
    state = torch.load(sorted((run / "nerfstudio_models").glob("*.ckpt"))[-1], weights_only=True)["pipeline"]
    means = state["_model.gauss_params.means"].numpy()
    opac = state["_model.gauss_params.opacities"].numpy()[:, 0]
    kept = opac >= np.log(1 / 255 / (1 - 1 / 255))  # ns-export drops opacity < 1/255
    vertex = ply["vertex"]
    assert vertex.count == int(kept.sum()) > 100
    np.testing.assert_allclose(np.stack([vertex["x"], vertex["y"], vertex["z"]], 1), means[kept], rtol=1e-6)


def _object_pixel_in_first_train_view(scene: Path):
    import json

    from PIL import Image

    name = Path(json.loads((scene / "transforms.json").read_text())["train_filenames"][0]).name
    gt = np.array(Image.open(scene / "gt_instances" / name))
    obj = np.bincount(gt[gt > 0]).argmax()
    ys, xs = np.nonzero(gt == obj)
    return f"{xs[len(xs) // 2]},{ys[len(ys) // 2]}"


@pytest.mark.slow
def test_trace3d_prompt_selects_an_object(trained):
    import json

    root, run = trained
    point = _object_pixel_in_first_train_view(root / "scene")
    out = root / "prompt"
    _run(BIN / "trace3d-prompt", "--load-config", run / "config.yml", "--view", "0", "--points", point, "--output-dir", out, cwd=root)
    summary = json.loads((out / "prompt.json").read_text())
    assert 0 < summary["selected_gaussians"] < summary["total_gaussians"]
    assert (out / "selection.ply").is_file() and len(list((out / "renders").glob("*.png"))) == 8
    bad = subprocess.run(
        [str(BIN / "trace3d-prompt"), "--load-config", str(root / "nope.yml"), "--view", "0", "--points", "1,1"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "config file not found" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_trace3d_trace_writes_labels_into_the_checkpoint(trained):
    import torch

    root, run = trained
    ckpt = sorted((run / "nerfstudio_models").glob("*.ckpt"))[-1]
    original = ckpt.read_bytes()
    try:
        state = torch.load(ckpt, weights_only=True)
        state["pipeline"]["_model.instance_labels"] = torch.zeros(0, dtype=torch.long)  # as if never traced
        state["pipeline"]["_model.instance_confidence"] = torch.zeros(0)
        torch.save(state, ckpt)
        _run(BIN / "trace3d-trace", "--load-config", run / "config.yml", cwd=root)
        labels = torch.load(ckpt, weights_only=True)["pipeline"]["_model.instance_labels"]
        assert labels.shape == state["pipeline"]["_model.gauss_params.means"].shape[:1] and (labels > 0).any()
        _run(BIN / "trace3d-trace", "--load-config", run / "config.yml", "--from", "features", cwd=root)
        clustered = torch.load(ckpt, weights_only=True)["pipeline"]
        assert clustered["_model.instance_labels"].shape == labels.shape
        confidence = clustered["_model.instance_confidence"]
        assert ((confidence >= 0) & (confidence <= 1 + 1e-6)).all()  # cosine similarities to the centroids
    finally:
        ckpt.write_bytes(original)
