"""The ablation's variants map to the right training flags, and the report renders every run."""

from pathlib import Path

from trace3d_ns.benchmarks.ablation import VARIANTS, AblationConfig, summary, train_command
from trace3d_ns.benchmarks.report import ablation_table, foreground_table


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_variants_switch_git_consistent_labels_and_density_control():
    cfg = AblationConfig(git_step=123, cycles=3)
    cmds = {n: train_command(Path("scene"), Path("work"), n, cfg, v) for n, v in VARIANTS.items()}
    assert _flag(cmds["no_git"], "--pipeline.git-step") == "-1"
    assert all(_flag(cmds[n], "--pipeline.git-step") == "123" for n in ("density_only", "consistent_only", "full"))
    assert [_flag(cmds[n], "--pipeline.use-consistent-labels") for n in VARIANTS] == ["False", "False", "True", "True"]
    assert [_flag(cmds[n], "--pipeline.density.cycles") for n in VARIANTS] == ["0", "3", "0", "3"]
    caches = {_flag(c, "--pipeline.datamanager.cache-dir") for c in cmds.values()}
    assert len(caches) == len(VARIANTS)  # runs side by side never share a mask cache


def _run(variant: str, iou: float) -> dict:
    sel = {"mean_iou": iou, "mean_iou_visible": iou + 0.1, "mean_psnr": 20.0, "novel_view_miou": iou + 0.1,
           "foreground_miou": 0.5, "foreground_macc": 0.9}
    return {"variant": VARIANTS[variant].__dict__, "selection": {"feature": sel, "instance": sel, "feature_clusters": sel},
            "test_psnr": 25.0, "num_gaussians": 1000, "ambiguous_fraction_gt": 0.0125,
            "ambiguous_fraction_consistent": 0.01}


def test_report_tables_have_a_row_per_run_with_its_numbers():
    runs = {"no_git": _run("no_git", 0.25), "full": _run("full", 0.75)}
    rows = ablation_table({"runs": runs}, "feature")
    assert len(rows) == 2 + 2
    assert rows[2].startswith("| `no_git` | - | - | - | 0.250 | 0.350 |") and rows[2].endswith("| 1.25% |")
    assert rows[3].startswith("| `full` | yes | yes | yes | 0.750 | 0.850 |")
    assert summary(runs)["object_iou_feature"] == {"no_git": 0.25, "full": 0.75}
    dtu = {"num_gaussians": 50, "config": {"points": [3, 16]},
           "points_3": {"feature": {"miou": 0.5, "macc": 0.875, "num_selected": 7}},
           "points_16": {"feature": {"miou": 0.75, "macc": 0.9375, "num_selected": 9}}}
    assert foreground_table(dtu)[0].startswith("| selection | 3 points mIoU | 3 points mAcc | 16 points mIoU |")
    assert foreground_table(dtu)[2] == "| feature | 0.500 | 0.875 | 0.750 | 0.938 | 7 / 50 |"


def test_a_finished_run_is_reused_only_for_the_same_command(tmp_path):
    from trace3d_ns.benchmarks.ablation import command_record, is_trained

    run, cmd = tmp_path / "run", ["ns-train", "trace3d", "--max-num-iterations", "10"]
    assert not is_trained(run, 10, cmd)
    (run / "nerfstudio_models").mkdir(parents=True)
    (run / "nerfstudio_models" / "step-000000009.ckpt").write_bytes(b"")
    assert not is_trained(run, 10, cmd)  # a checkpoint without the command that made it
    command_record(run).write_text(" ".join(cmd))
    assert is_trained(run, 10, cmd)
    assert not is_trained(run, 10, cmd[:-1] + ["20"]) and not is_trained(run, 20, cmd)
