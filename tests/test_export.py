"""Export: ns-export-identical PLY bytes, round trip, segmented export, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import numpy as np
import plyfile
import pytest
import torch

from trace3d_ns.export.ply import (
    MIN_OPACITY_LOGIT,
    SH_C0,
    SplatTable,
    gaussian_params_from_ply,
    read_ply,
    splat_property_names,
    write_gaussian_ply,
)
from trace3d_ns.export.segmented import export_segmented, instance_labels_from_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def random_params(n: int, num_rest: int = 15, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Splatfacto-shaped parameters; opacity logits spread around the export threshold."""
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(n, 3, generator=g),
        "scales": torch.randn(n, 3, generator=g) - 4.0,
        "quats": torch.randn(n, 4, generator=g),
        "features_dc": torch.randn(n, 3, generator=g),
        "features_rest": torch.randn(n, num_rest, 3, generator=g),
        "opacities": torch.randn(n, 1, generator=g) * 4.0,
    }


def with_bad_rows(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rows 0-5: NaN rotation, Inf scale, NaN SH, opacity -6 (dropped); opacity exactly -5.5373, -5.5 (kept).

    No NaN in x, y or z: ns-export tests those 1-D columns with `.all(axis=-1)` over all rows, so one
    NaN position makes it drop every Gaussian (see `test_nan_position_drops_only_its_row`).
    """
    p = {k: v.clone() for k, v in params.items()}
    p["quats"][0, 1] = float("nan")
    p["scales"][1, 2] = float("inf")
    if p["features_rest"].shape[1]:
        p["features_rest"][2, -1, 0] = float("nan")
    else:
        p["features_dc"][2, 0] = float("nan")
    p["opacities"][3, 0] = -6.0
    p["opacities"][4, 0] = float(MIN_OPACITY_LOGIT)
    p["opacities"][5, 0] = -5.5
    return p


def split_ply(data: bytes) -> tuple[list[str], bytes]:
    """(header lines, binary body) of a PLY file."""
    end = data.index(b"end_header\n") + len(b"end_header\n")
    return data[:end].decode().splitlines(), data[end:]


@pytest.fixture(scope="module")
def ns_export(tmp_path_factory):
    """Run nerfstudio's own `ExportGaussianSplat.main` on given parameters; returns the PLY bytes."""
    from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig
    from nerfstudio.scripts import exporter

    def run(params: Dict[str, torch.Tensor], sh_degree: int) -> bytes:
        model = SplatfactoModel.__new__(SplatfactoModel)  # a parameter holder; nothing is rendered
        torch.nn.Module.__init__(model)
        model.config = SplatfactoModelConfig(sh_degree=sh_degree)
        model.gauss_params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in params.items()})
        out = tmp_path_factory.mktemp("ns")
        original = exporter.eval_setup
        exporter.eval_setup = lambda *args, **kwargs: (None, SimpleNamespace(model=model), None, None)
        try:
            exporter.ExportGaussianSplat(load_config=Path("unused.yml"), output_dir=out).main()
        finally:
            exporter.eval_setup = original
        return (out / "splat.ply").read_bytes()

    return run


@pytest.mark.parametrize("sh_degree", [3, 0])
def test_bytes_equal_ns_export(ns_export, tmp_path, sh_degree):
    params = with_bad_rows(random_params(300, num_rest=(sh_degree + 1) ** 2 - 1, seed=sh_degree))
    theirs = ns_export(params, sh_degree)
    keep = write_gaussian_ply(tmp_path / "ours.ply", params)
    ours = (tmp_path / "ours.ply").read_bytes()

    their_header, their_body = split_ply(theirs)
    our_header, our_body = split_ply(ours)
    def layout(header: list[str]) -> list[str]:
        return [line for line in header if not line.startswith("comment")]

    assert layout(our_header) == layout(their_header)
    assert our_body == their_body
    assert keep[:6].tolist() == [False, False, False, False, True, True]
    assert int(keep.sum()) == int(their_header[4].split()[-1])  # "element vertex N"


def test_nan_position_drops_only_its_row():
    params = random_params(50, seed=4)
    params["opacities"][:] = 0.0
    params["means"][7, 2] = float("nan")
    params["means"][9, 0] = float("-inf")
    keep = SplatTable.from_params(params).export_mask()
    assert np.flatnonzero(~keep).tolist() == [7, 9]


def test_round_trip_bit_exact_and_plyfile(tmp_path):
    params = random_params(500, num_rest=15, seed=1)
    params["opacities"] = params["opacities"].clamp(min=-5.0)  # keep all
    instance = np.arange(500, dtype=np.int32) % 7 - 1
    write_gaussian_ply(tmp_path / "g.ply", params, extra={"instance": instance})

    columns = read_ply(tmp_path / "g.ply")
    assert list(columns) == list(splat_property_names(15)) + ["instance"]
    assert columns["instance"].dtype == np.int32 and np.array_equal(columns["instance"], instance)
    back = gaussian_params_from_ply(columns)
    for key, value in params.items():
        expected = value.numpy().reshape(back[key].shape)
        assert back[key].dtype == np.float32 and np.array_equal(back[key], expected), key
    assert not columns["nx"].any() and not columns["nz"].any()

    ply = plyfile.PlyData.read(str(tmp_path / "g.ply"))
    vertex = ply["vertex"]
    assert [p.name for p in vertex.properties] == list(columns)
    assert vertex["instance"].dtype == np.int32
    assert np.array_equal(vertex["f_rest_16"], params["features_rest"][:, 1, 1].numpy())  # channel-major: 15 + 1
    assert np.array_equal(vertex["rot_0"], params["quats"][:, 0].numpy())  # w first


def test_table_from_model_like_object_and_shape_errors():
    params = random_params(10, num_rest=0)
    table = SplatTable.from_params(SimpleNamespace(gauss_params=params))
    assert table.values.shape == (10, 17) and table.names == splat_property_names(0)
    bad = dict(params, quats=params["quats"][:, :3])
    with pytest.raises(ValueError, match="quats"):
        SplatTable.from_params(bad)


def segment_scene() -> tuple[Dict[str, torch.Tensor], np.ndarray, Dict[int, np.ndarray]]:
    """400 Gaussians: instances 1 (150), 2 (100), 5 (2), background 0 (98), ambiguous -1 (50).

    Row 0 (instance 1) has a NaN and is dropped. Each instance has one known colour.
    """
    params = random_params(400, num_rest=3, seed=2)
    params["opacities"][:] = 1.0
    labels = np.concatenate([np.full(150, 1), np.full(100, 2), np.full(2, 5), np.full(98, 0), np.full(50, -1)])
    colours = {1: np.array([0.2, 0.4, 0.6]), 2: np.array([0.9, 0.1, 0.5]), 5: np.array([0.0, 1.0, 0.3])}
    for instance_id, rgb in colours.items():
        params["features_dc"][labels == instance_id] = torch.tensor((rgb - 0.5) / SH_C0, dtype=torch.float32)
    params["means"][0, 0] = float("nan")
    return params, labels, colours


def test_segmented_export_files_and_index(tmp_path):
    params, labels, colours = segment_scene()
    index = export_segmented(params, labels, tmp_path, min_gaussians=3)

    assert [i["id"] for i in index["instances"]] == [1, 2]
    assert index["skipped"] == [{"id": 5, "num_gaussians": 2, "reason": "fewer than 3 exported Gaussians"}]
    assert not (tmp_path / "instance_5.ply").exists()
    assert json.loads((tmp_path / "instances.json").read_text()) == index
    counts = [index[k] for k in ("num_gaussians", "num_exported", "num_background", "num_ambiguous")]
    assert counts == [400, 399, 98, 50]
    total = sum(i["num_gaussians"] for i in index["instances"]) + sum(s["num_gaussians"] for s in index["skipped"])
    assert total + index["num_background"] + index["num_ambiguous"] == index["num_exported"]

    scene = read_ply(tmp_path / "scene.ply")
    assert np.array_equal(scene["instance"], labels[1:])
    means = params["means"].numpy()
    for entry in index["instances"]:
        columns = read_ply(tmp_path / entry["file"])
        assert list(columns) == list(splat_property_names(3))
        rows = np.flatnonzero(labels == entry["id"])[1 if entry["id"] == 1 else 0 :]
        assert entry["num_gaussians"] == len(columns["x"]) == len(rows)
        xyz = np.stack([columns["x"], columns["y"], columns["z"]], axis=1)
        assert np.array_equal(xyz, means[rows])
        assert (xyz >= np.array(entry["bbox_min"])).all() and (xyz <= np.array(entry["bbox_max"])).all()
        assert np.allclose(entry["bbox_min"], xyz.min(axis=0)) and np.allclose(entry["bbox_max"], xyz.max(axis=0))
        assert np.allclose(entry["mean_rgb"], colours[entry["id"]], atol=1e-6)


def test_segmented_explicit_ids_percentile_box_and_errors(tmp_path):
    params, labels, _ = segment_scene()
    params["means"][10] = torch.tensor([100.0, 100.0, 100.0])  # an outlier of instance 1
    index = export_segmented(params, labels, tmp_path, instances=[2, 1], bbox_percentiles=(1, 99))
    assert [i["id"] for i in index["instances"]] == [1, 2] and not (tmp_path / "instance_5.ply").exists()
    assert index["bbox"] == {"method": "percentile", "percentiles": [1, 99]}
    assert max(index["instances"][0]["bbox_max"]) < 100.0  # the 99th percentile ignores the outlier
    assert min(index["instances"][0]["bbox_max"]) > 1.0

    with pytest.raises(ValueError, match=r"\[7\] are not in the labels"):
        export_segmented(params, labels, tmp_path, instances=[1, 7])
    with pytest.raises(ValueError, match="shape"):
        export_segmented(params, labels[:-1], tmp_path)


def test_sh_degree_0_colour_from_logits(tmp_path):
    params = random_params(20, num_rest=0, seed=3)
    params["opacities"][:] = 1.0
    params["features_dc"][:] = torch.logit(torch.tensor([0.25, 0.5, 0.75]))
    index = export_segmented(params, np.ones(20, dtype=np.int64), tmp_path)
    assert np.allclose(index["instances"][0]["mean_rgb"], [0.25, 0.5, 0.75], atol=1e-6)


def test_instance_labels_from_model():
    assert instance_labels_from_model(SimpleNamespace()) is None
    labels = instance_labels_from_model(SimpleNamespace(instance_labels=torch.tensor([[3], [0], [-1]])))
    assert labels.dtype == np.int64 and labels.tolist() == [3, 0, -1]


def test_export_benchmark_smoke(ns_export):  # ns_export: nerfstudio's exporter is already imported
    from trace3d_ns.benchmarks.export import run_export_benchmark

    result = run_export_benchmark(num_gaussians=2000, nerfstudio_gaussians=200, repeats=1)
    assert 0 < result["num_written"] < 2000
    assert result["nerfstudio_write_s_per_million_extrapolated"] == pytest.approx(result["nerfstudio_write_s"] * 5000)
    assert result["speedup_per_gaussian_extrapolated"] > 1.0


def test_cli_missing_config(tmp_path):
    missing = tmp_path / "nope.yml"
    command = [sys.executable, "-m", "trace3d_ns.export.cli", "--load-config", str(missing), "--output-dir", str(tmp_path / "o")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"trace3d-export: error: config file not found: {missing}"]
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """config.yml of a 10-step trace3d run on a small generated scene (about 20 s)."""
    root = tmp_path_factory.mktemp("ckpt")
    scene = [str(BIN / "trace3d-scene"), "--out", str(root / "scene"), "--views", "8", "--size", "48"]
    subprocess.run(scene, check=True, capture_output=True, cwd=root)
    train = [
        str(BIN / "ns-train"), "trace3d", "--data", str(root / "scene"), "--machine.device-type", "cpu",
        "--vis", "tensorboard", "--max-num-iterations", "10", "--steps-per-save", "10",
        "--output-dir", str(root / "out"), "--pipeline.datamanager.mask-source", "superpixel",
    ]  # fmt: skip
    result = subprocess.run(train, capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    (config,) = (root / "out").glob("*/trace3d/*/config.yml")
    return config


def test_cli_end_to_end(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from nerfstudio.utils import eval_utils

    from trace3d_ns.export import cli

    # No labels yet: --instances all writes the plain scene with a warning, explicit ids fail.
    assert cli.main(["--load-config", str(tiny_checkpoint), "--output-dir", str(tmp_path / "plain")]) == 0
    assert "no instance labels" in capsys.readouterr().err
    plain = read_ply(tmp_path / "plain" / "scene.ply")
    assert list(plain) == list(splat_property_names(15)) and len(plain["x"]) > 0
    assert cli.main(["--load-config", str(tiny_checkpoint), "--output-dir", str(tmp_path / "x"), "--instances", "1"]) == 2
    assert "no instance labels" in capsys.readouterr().err

    # Labels injected into the loaded model (the instance stage is someone else's): segmented export.
    real_setup = eval_utils.eval_setup

    def labelled_setup(*args, **kwargs):
        config, pipeline, path, step = real_setup(*args, **kwargs)
        n = pipeline.model.num_points
        pipeline.model.instance_labels = torch.arange(n) % 4 - 1  # -1, 0, 1, 2, ...
        return config, pipeline, path, step

    monkeypatch.setattr(eval_utils, "eval_setup", labelled_setup)
    out = tmp_path / "seg"
    assert cli.main(["--load-config", str(tiny_checkpoint), "--output-dir", str(out), "--min-gaussians", "2"]) == 0
    index = json.loads((out / "instances.json").read_text())
    assert [i["id"] for i in index["instances"]] == [1, 2]
    scene = read_ply(out / "scene.ply")
    assert len(scene["x"]) == index["num_exported"] == len(plain["x"])
    for entry in index["instances"]:
        in_scene = int((scene["instance"] == entry["id"]).sum())
        assert len(read_ply(out / entry["file"])["x"]) == entry["num_gaussians"] == in_scene
