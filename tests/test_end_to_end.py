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
