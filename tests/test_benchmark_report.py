"""The ablation's variants and schedule map to the right training flags, its summary statistics are
right, its picture picks the same objects for every variant, and the report renders every run."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from trace3d_ns.benchmarks.ablation import (
    HEADLINE,
    VARIANTS,
    AblationConfig,
    Schedule,
    ablation_config,
    deltas,
    run_name,
    summary,
    train_command,
)
from trace3d_ns.benchmarks.pictures import comparison_rgb, picture_subjects
from trace3d_ns.benchmarks.report import (
    ablation_delta_table,
    ablation_section,
    ablation_seed_table,
    ablation_table,
    foreground_table,
)
from trace3d_ns.evaluation.ground_truth import View


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_schedule_follows_the_papers_stages():
    s = Schedule.of(5000)
    assert (s.warmup, s.stop_split_at, s.git_step, s.every, s.feature_start) == (250, 1250, 2500, 300, 3500)
    assert s.cycle_steps() == [2500, 2800, 3100, 3400]  # inside the fine-tune, before the lifting
    small = Schedule.of(60)
    assert small.stop_split_at <= small.git_step <= small.cycle_steps()[-1] <= small.feature_start < 60
    with pytest.raises(ValueError, match="at least 20 steps"):
        Schedule.of(10)


def test_variants_switch_git_consistent_labels_and_density_control():
    cfg = AblationConfig(steps=1000)
    cmds = {n: train_command(Path("scene"), Path("work"), run_name(n, 7), cfg, v, seed=7) for n, v in VARIANTS.items()}
    assert _flag(cmds["no_git"], "--pipeline.git-step") == "-1"
    assert all(_flag(cmds[n], "--pipeline.git-step") == "500" for n in ("density_only", "consistent_only", "full"))
    assert [_flag(cmds[n], "--pipeline.use-consistent-labels") for n in VARIANTS] == ["False", "False", "True", "True"]
    assert [_flag(cmds[n], "--pipeline.density.cycles") for n in VARIANTS] == ["0", "4", "0", "4"]
    for n in ("density_only", "full"):
        assert (_flag(cmds[n], "--pipeline.density.start-step"), _flag(cmds[n], "--pipeline.density.every")) == ("500", "60")
        assert int(_flag(cmds[n], "--pipeline.density.start-step")) >= int(_flag(cmds[n], "--pipeline.model.stop-split-at"))
    for cmd in cmds.values():  # the same schedule and seed for every variant
        assert _flag(cmd, "--machine.seed") == "7" and _flag(cmd, "--pipeline.model.feature-start-step") == "700"
        assert _flag(cmd, "--pipeline.model.stop-split-at") == "250" and _flag(cmd, "--max-num-iterations") == "1000"
    caches = {_flag(c, "--pipeline.datamanager.cache-dir") for c in cmds.values()}
    assert len(caches) == len(VARIANTS)  # runs side by side never share a mask cache


def test_variants_continue_from_one_rgb_stage_per_seed():
    from trace3d_ns.benchmarks.ablation import rgb_stage_checkpoint, rgb_stage_command

    cfg, work = AblationConfig(steps=1000), Path("work")
    rgb = rgb_stage_command(Path("scene"), work, cfg, seed=7)
    assert _flag(rgb, "--max-num-iterations") == "500" and _flag(rgb, "--steps-per-save") == "500"
    assert _flag(rgb, "--pipeline.git-step") == "-1" and _flag(rgb, "--pipeline.density.cycles") == "0"
    assert "--load-checkpoint" not in rgb
    ckpt = rgb_stage_checkpoint(work, cfg, 7)
    assert ckpt.name == "step-000000499.ckpt" and "rgb_stage_s7" in str(ckpt)
    whole = {n: train_command(Path("scene"), work, run_name(n, 7), cfg, v, seed=7) for n, v in VARIANTS.items()}
    rest = {n: train_command(Path("scene"), work, run_name(n, 7), cfg, v, seed=7, stage="after_rgb") for n, v in VARIANTS.items()}
    for n, cmd in rest.items():
        assert _flag(cmd, "--load-checkpoint") == str(ckpt) and _flag(cmd, "--max-num-iterations") == "500"
        # the same run as training from scratch, but for its length and start
        drop = {"--load-checkpoint", "--max-num-iterations", "--steps-per-save"}
        strip = lambda c: [a for i, a in enumerate(c) if a not in drop and (i == 0 or c[i - 1] not in drop)]
        assert strip(cmd) == strip(whole[n])
        # the RGB stage trains what every variant trains before git_step
        for flag in ("--pipeline.model.stop-split-at", "--pipeline.model.warmup-length", "--machine.seed",
                     "--pipeline.model.feature-start-step", "--pipeline.datamanager.folder.directory"):
            assert _flag(cmd, flag) == _flag(rgb, flag)
        assert int(_flag(cmd, "--pipeline.model.stop-split-at")) < int(_flag(rgb, "--max-num-iterations"))


def test_a_run_continued_from_another_waits_for_it_and_records_it(tmp_path):
    import sys

    from trace3d_ns.benchmarks.ablation import command_record, is_trained, run_record, train_runs

    runs = {n: tmp_path / n for n in ("stage", "a", "b", "free")}
    for folder in runs.values():
        folder.mkdir()
    # each run appends its name to one file when it starts, and when it ends
    def cmd(name, sleep):
        code = (f"import time, pathlib; p = pathlib.Path({str(tmp_path / 'order.txt')!r}); "
                f"p.open('a').write('start {name}\\n'); time.sleep({sleep}); p.open('a').write('end {name}\\n')")
        return [sys.executable, "-c", code]
    commands = {"a": cmd("a", 0), "b": cmd("b", 0), "stage": cmd("stage", 1.5), "free": cmd("free", 0)}
    after = {"a": runs["stage"], "b": runs["stage"]}
    train_runs(commands, tmp_path, 2, runs, after)
    order = (tmp_path / "order.txt").read_text().split("\n")
    for name in ("a", "b"):
        assert order.index(f"start {name}") > order.index("end stage")
    assert order.index("start free") < order.index("end stage")  # a waiting run does not hold a free slot
    assert command_record(runs["a"]).read_text() == run_record(commands["a"], runs["stage"])
    assert "# continued from " + command_record(runs["stage"]).read_text() in command_record(runs["a"]).read_text()
    (runs["a"] / "nerfstudio_models").mkdir()
    (runs["a"] / "nerfstudio_models" / "step-000000009.ckpt").write_bytes(b"")
    assert is_trained(runs["a"], 10, commands["a"], runs["stage"])
    command_record(runs["stage"]).write_text("another stage")
    assert not is_trained(runs["a"], 10, commands["a"], runs["stage"])  # its start changed
    with pytest.raises(RuntimeError, match="wait for runs that are not scheduled"):
        train_runs({"a": commands["a"]}, tmp_path, 2, {"a": runs["a"], "stage": runs["stage"]}, {"a": runs["stage"]})


def test_config_overrides_and_their_errors():
    assert AblationConfig().steps >= 5000 and len(AblationConfig().seeds) == 3 and AblationConfig().size >= 160
    cfg = ablation_config(steps=40, size=None, seeds=[0], variants=["full"])
    assert (cfg.steps, cfg.size, cfg.seeds, cfg.variants) == (40, 160, [0], ["full"])
    with pytest.raises(ValueError, match="unknown ablation variants"):
        ablation_config(variants=["nope"])
    with pytest.raises(ValueError, match="distinct"):
        ablation_config(seeds=[1, 1])


def _run(variant: str, iou: float, psnr: float = 25.0) -> dict:
    sel = {"object_iou_amodal": iou, "object_biou": iou / 2, "novel_view_miou": iou + 0.1, "test_psnr": psnr,
           "object_iou": iou - 0.1}
    return {"variant": VARIANTS[variant].__dict__,
            "selection": {"feature": sel, "instance": dict(sel, object_biou=None), "feature_instance": dict(sel, object_iou_amodal=iou + 0.02)},
            "num_gaussians": 1000, "ambiguous_fraction_gt": 0.0125, "ambiguous_fraction_consistent": 0.01,
            "oracle": {"object_iou_amodal": iou + 0.05, "object_biou": iou / 2 + 0.05, "per_object": {}}}


RUNS = {
    "no_git": {"0": _run("no_git", 0.5), "1": _run("no_git", 0.6), "2": _run("no_git", 0.7)},
    "full": {"0": _run("full", 0.7), "1": _run("full", 0.9), "2": _run("full", 0.8, psnr=26.0)},
}


def test_summary_mean_std_and_per_seed_values():
    s = summary(RUNS)
    iou = s["full"]["object_iou_amodal"]
    assert iou["mean"] == pytest.approx(0.8) and iou["std"] == pytest.approx(0.1)  # sample std of 0.7, 0.9, 0.8
    assert iou["values"] == {"0": 0.7, "1": 0.9, "2": 0.8}
    assert set(HEADLINE) <= set(s["full"])
    assert s["full"]["object_biou_instance"] == {"mean": None, "std": None, "values": {"0": None, "1": None, "2": None}}
    assert s["full"]["object_iou_amodal_oracle"]["mean"] == pytest.approx(0.85)
    assert s["full"]["object_iou_amodal_feature_instance"]["mean"] == pytest.approx(0.82)
    assert s["full"]["object_iou_amodal_traced"]["mean"] is None  # not measured in these runs
    assert summary({"full": {"0": {**_run("full", 0.4), "oracle": {}}}})["full"]["object_iou_amodal_oracle"]["mean"] is None
    d = deltas(RUNS, "no_git")
    assert set(d) == {"full"}
    assert d["full"]["object_iou_amodal"]["values"] == pytest.approx({"0": 0.2, "1": 0.3, "2": 0.1})
    assert d["full"]["test_psnr"]["mean"] == pytest.approx(1 / 3)
    one = summary({"full": {"0": _run("full", 0.4)}})
    assert one["full"]["object_iou_amodal"]["std"] == 0.0


def test_report_tables_and_pictures():
    result = {"summary": summary(RUNS), "config": AblationConfig().__dict__ | {"seeds": [0, 1, 2]},
              "schedule": Schedule.of(5000).__dict__, "commands": {"scene_s0": "/x/bin/trace3d-scene --out s --clutter"}}
    rows = ablation_table(result)
    assert len(rows) == 2 + 2
    assert rows[2].startswith("| `no_git` | - | - | - | 0.600 ± 0.100 | 0.300 ± 0.050 | 0.700 ± 0.100 | 25.00 ± 0.00 |")
    assert rows[3].startswith("| `full` | yes | yes | yes | 0.800 ± 0.100 |") and rows[3].endswith("| - | 0.820 ± 0.100 | 0.850 ± 0.100 | 1000 ± 0 | 1.25 ± 0.00 |")
    result["delta_vs_no_git"] = deltas(RUNS, "no_git")
    assert ablation_delta_table(result)[2].startswith("| `full` | 0.200 ± 0.100 |")
    seeds = ablation_seed_table(result)
    assert seeds[0] == "| variant | metric | seed 0 | seed 1 | seed 2 |"
    assert "| `full` | object_iou_amodal | 0.700 | 0.900 | 0.800 |" in seeds
    text = "\n".join(ablation_section(result, {"full": "docs/benchmarks/ablation_full.png"}))
    assert "![full](docs/benchmarks/ablation_full.png)" in text and "![no_git]" not in text
    assert "4 cycles every 300 steps from 2500" in text and "trace3d-scene --out s --clutter" in text
    dtu = {"num_gaussians": 50, "config": {"points": [3, 16]},
           "points_3": {"feature": {"miou": 0.5, "macc": 0.875, "num_selected": 7}},
           "points_16": {"feature": {"miou": 0.75, "macc": 0.9375, "num_selected": 9}}}
    assert foreground_table(dtu)[0].startswith("| selection | 3 points mIoU | 3 points mAcc | 16 points mIoU |")
    assert foreground_table(dtu)[2] == "| feature | 0.500 | 0.875 | 0.750 | 0.938 | 7 / 50 |"


def test_picture_subjects_depend_on_the_ground_truth_only():
    def mask(rows, cols):
        m = np.zeros((20, 20), bool)
        m[rows, cols] = True
        return m

    few = View("a", None, np.zeros((20, 20), int), None, {1: mask(slice(0, 5), slice(0, 5)), 2: np.zeros((20, 20), bool)})
    many = View("b", None, np.zeros((20, 20), int), None, {
        1: mask(slice(0, 10), slice(0, 10)),  # ground, largest
        2: mask(slice(0, 2), slice(0, 2)),  # leaning, small
        3: mask(slice(0, 6), slice(0, 6)),  # ground
        4: mask(slice(0, 3), slice(0, 3)),  # stacked
    })
    meta = {"objects": [{"id": 1, "role": "ground"}, {"id": 2, "role": "leaning"}, {"id": 3, "role": "ground"},
                        {"id": 4, "role": "stacked"}]}
    view, ids = picture_subjects([few, many], meta, 3)
    assert view.name == "b" and ids == [2, 4, 1]  # one per role (leaning, thin, stacked, ground), then by size
    assert picture_subjects([few, many], meta, 4)[1] == [2, 4, 1, 3]
    with pytest.raises(ValueError, match="amodal"):
        picture_subjects([View("c", None, np.zeros((2, 2), int))], meta, 2)


def test_comparison_colours():
    pred = np.array([[True, True, False, False]])
    gt = np.array([[True, False, True, False]])
    out = comparison_rgb(pred, gt)
    assert [tuple(c) for c in out[0]] == [(200, 200, 200), (230, 40, 40), (40, 90, 240), (0, 0, 0)]


def test_a_finished_run_is_reused_only_for_the_same_command_and_defaults(tmp_path, monkeypatch):
    from trace3d_ns.benchmarks import ablation
    from trace3d_ns.benchmarks.ablation import command_record, is_trained, run_record

    run, cmd = tmp_path / "run", ["ns-train", "trace3d", "--max-num-iterations", "10"]
    assert not is_trained(run, 10, cmd)
    (run / "nerfstudio_models").mkdir(parents=True)
    (run / "nerfstudio_models" / "step-000000009.ckpt").write_bytes(b"")
    assert not is_trained(run, 10, cmd)  # a checkpoint without the command that made it
    command_record(run).write_text(" ".join(cmd))
    assert not is_trained(run, 10, cmd)  # the command alone, without the defaults it ran under
    command_record(run).write_text(run_record(cmd))
    assert is_trained(run, 10, cmd)
    assert not is_trained(run, 10, cmd[:-1] + ["20"]) and not is_trained(run, 20, cmd)
    assert is_trained(run, 10, ["/another/venv/bin/ns-train", *cmd[1:]])  # the same command from elsewhere
    monkeypatch.setattr(ablation, "method_fingerprint", lambda: "another default")
    assert not is_trained(run, 10, cmd)


def test_a_changed_scene_is_generated_again_and_its_runs_retrained(tmp_path, monkeypatch):
    from trace3d_ns.benchmarks import ablation
    from trace3d_ns.benchmarks.ablation import command_record, prepare_scenes, run_dir

    cfg = ablation_config(size=24, views=3, objects=2, seeds=[4])
    commands = prepare_scenes(tmp_path, cfg)
    assert "--seed 4" in commands["scene_s4"] and "--clutter" in commands["scene_s4"]
    scene = tmp_path / "scene_s4" / "scene.json"
    record = command_record(run_dir(tmp_path, run_name("full", 4)))
    record.parent.mkdir(parents=True)
    record.write_text("trained")
    first = scene.stat().st_mtime_ns
    prepare_scenes(tmp_path, cfg)  # same command: nothing happens
    assert scene.stat().st_mtime_ns == first and record.is_file()
    with monkeypatch.context() as m:  # the same command from another virtual environment: nothing either
        m.setattr(ablation, "BIN", tmp_path / "elsewhere" / "bin")
        assert str(tmp_path / "elsewhere") in prepare_scenes(tmp_path, cfg)["scene_s4"]
    assert scene.stat().st_mtime_ns == first and record.is_file()
    prepare_scenes(tmp_path, ablation_config(size=24, views=3, objects=3, seeds=[4]))
    assert len(json.loads(scene.read_text())["objects"]) == 3 and not record.exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRACE3D_SLOW") != "1", reason="trains 2 runs with ns-train (minutes); set TRACE3D_SLOW=1")
def test_ablation_end_to_end_on_a_tiny_setting(tmp_path):
    """Scenes, training, measuring and pictures of two variants at 40 steps, 40 px, one seed."""
    from trace3d_ns.benchmarks.ablation import run_ablation, write_result

    cfg = ablation_config(steps=40, size=40, views=8, objects=5, seeds=[0], variants=["no_git", "full"])
    result = run_ablation(tmp_path / "work", cfg)
    write_result(result, tmp_path / "out" / "ablation.json")
    assert sorted(result["trained"]) == ["full_s0", "no_git_s0", "rgb_stage_s0"]  # one RGB stage, two continuations
    assert all(result["runs"][v]["0"]["step"] == 39 for v in ("no_git", "full"))
    for variant in ("no_git", "full"):
        for key in HEADLINE:
            assert result["summary"][variant][key]["values"]["0"] is not None
        assert (tmp_path / "out" / f"ablation_{variant}.png").is_file()
        assert 0.0 <= result["summary"][variant]["object_iou_amodal_oracle"]["values"]["0"] <= 1.0
    assert len(result["runs"]["full"]["0"]["density_cycles"]) == 4


def test_a_measurement_is_reused_only_for_the_same_run_arguments_and_code(tmp_path, monkeypatch):
    from trace3d_ns.benchmarks import ablation
    from trace3d_ns.benchmarks.ablation import command_record, measure_runs

    run = tmp_path / "run"
    run.mkdir()
    command_record(run).write_text("ns-train ...\n")
    calls = []
    monkeypatch.setattr(ablation, "measure_run", lambda *args: calls.append(args) or {"value": len(calls)})
    job = {"a": (run / "config.yml", tmp_path / "scene", None, 4)}
    assert measure_runs(job) == {"a": {"value": 1}}
    assert measure_runs(job) == {"a": {"value": 1}} and len(calls) == 1  # kept in the run folder
    assert measure_runs({"a": (run / "config.yml", tmp_path / "scene", None, 3)})["a"] == {"value": 2}  # other arguments
    command_record(run).write_text("ns-train ... retrained\n")
    assert measure_runs(job)["a"] == {"value": 3}  # the run was trained again
    monkeypatch.setattr(ablation, "code_fingerprint", lambda: "other code")
    assert measure_runs(job)["a"] == {"value": 4}


def test_benchmark_subprocesses_import_the_benchmarks_own_package(tmp_path):
    """A benchmark run from a snapshot of the repository trains with that snapshot's code, not with
    the copy the virtual environment installed (an editable install points at the main checkout)."""
    import subprocess
    import sys

    from trace3d_ns.benchmarks.ablation import PACKAGE_ROOT, single_thread_env

    env = single_thread_env(2)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PACKAGE_ROOT)
    out = subprocess.run([sys.executable, "-c", "import trace3d_ns; print(trace3d_ns.__file__)"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve() == PACKAGE_ROOT / "trace3d_ns" / "__init__.py"


def test_step_benchmark_steps_the_trainers_in_turn():
    """Round robin (so drift hits every variant alike), warm-up steps untimed, one median each."""
    from trace3d_ns.benchmarks.step import _time_interleaved

    calls = []

    class FakeTrainer:
        callbacks = []

        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def train_iteration(self, step):
            calls.append((self.name, step))
            time.sleep(self.seconds)

    medians = _time_interleaved({"fast": FakeTrainer("fast", 0.001), "slow": FakeTrainer("slow", 0.02)}, steps=3, warmup=1)
    assert calls == [(name, step) for step in range(4) for name in ("fast", "slow")]
    assert set(medians) == {"fast", "slow"} and medians["fast"] < 0.01 <= medians["slow"]
