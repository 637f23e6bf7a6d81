"""scripts/gpu_check.sh: the CPU run passes every stage, a failing stage gives a non-zero exit, and
the backend comparison it runs on CUDA flags what differs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
STAGES = {"environment", "backends", "scene", "train", "trace", "prompt", "export", "eval", "ns_export", "viewer",
          "git_over_forward"}  # fmt: skip


def test_cpu_run_passes_every_stage(tmp_path, monkeypatch, capsys):
    """The `--device cpu` run, tiny (8 views of 32 px, 12 steps; about 50 s on 2 loaded cores). In-process:
    a second interpreter would import nerfstudio again; the subprocess test below runs the script."""
    from trace3d_ns.gpu_check.__main__ import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # main hides GPUs too; restored after the test
    code = main(["--device", "cpu", "--steps", "12", "--views", "8", "--size", "32", "--work", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    failed = {k: v.get("error") for k, v in report["stages"].items() if not v["ok"]}
    assert code == 0 and report["ok"], f"failed stages: {failed}; log: {(tmp_path / 'gpu_check.log').read_text()[-3000:]}"
    assert set(report["stages"]) == STAGES
    stages = report["stages"]
    assert "gsplat comparison is skipped" in stages["backends"]["skipped"]
    assert stages["backends"]["comparisons"]["compiled"]["ok"]  # compiled held to the torch reference
    assert stages["train"]["device"] == "cpu" and stages["train"]["fallback_warnings"] == 1  # auto -> cpu, one warning
    assert stages["train"]["density_cycles"] == 2 and stages["prompt"]["selected"] > 0
    assert stages["viewer"]["outputs"][:4] == ["rgb", "feature_pca", "instance", "selection"]
    assert stages["viewer"]["http_status"] == 200
    assert stages["git_over_forward"]["git_over_forward"] > 0
    assert all(v["seconds"] >= 0 for v in stages.values())


def test_script_prints_one_json_object_and_fails_without_a_gpu(tmp_path):
    """`--device cuda` where torch sees no GPU: the environment stage fails, the stages that need it
    are not run, stdout is the JSON report alone, and the exit code is 1."""
    env = {**os.environ, "TRACE3D_PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cuda", "--work", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["ok"] is False and set(report["stages"]) == STAGES
    assert "no CUDA GPU" in report["stages"]["environment"]["error"]
    assert report["stages"]["train"]["error"].startswith("not run: needs environment")
    assert Path(report["log"]).is_file()


def test_script_rejects_too_few_steps(tmp_path):
    env = {**os.environ, "TRACE3D_PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--steps", "5"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "--steps must be at least 12" in out.stderr


def test_backend_comparison_passes_equal_results_and_flags_differences():
    from trace3d_ns.gpu_check import backends as b

    size = b.SMALL
    ref = b.results(b.backend("torch"), b.scene(size), size)
    same = b.compare(ref, {k: v.clone() for k, v in ref.items()})
    assert same["ok"] and same["failed"] == [] and same["errors"]["render_max"] == 0.0
    assert same["errors"]["cam0_pairs"] > 100 and same["errors"]["git_rel"] == 0.0

    off = dict(ref, render=ref["render"] + 0.05, means2d_grad=1.1 * ref["means2d_grad"])
    assert {"render", "means2d_grad"} <= set(b.compare(ref, off)["failed"])
    fewer = dict(ref, pairs0=ref["pairs0"][:, ::2], weights0=ref["weights0"][::2], git_sums=0.5 * ref["git_sums"])
    assert {"cam0_pairs", "git_sums"} <= set(b.compare(ref, fewer)["failed"])
    no_absgrad = {k: v for k, v in ref.items() if k != "means2d_absgrad"}
    assert "means2d_absgrad" in b.compare(ref, no_absgrad)["failed"]
