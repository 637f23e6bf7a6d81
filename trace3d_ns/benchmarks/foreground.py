"""Foreground segmentation on a real scene: DTU scan 37 (``../shared/data/dtu_scan37``), NVOS's
metrics.

    python -m trace3d_ns.benchmarks.dtu --out dtu.json [--work DIR] [--data DIR]

One ``ns-train trace3d`` run on the CPU with weights-free masks (``superpixel``: Felzenszwalb
segments at two scales stand in for SAM, whose weights cannot be downloaded here), then
``trace3d_ns.evaluation.harness`` on its test views with the scene's ``gt_masks/`` (foreground =
the objects on the bricks): ``points`` prompt points spread over the GT foreground of one training
view, the union of their selections, its visible silhouette scored per test view (mIoU, mAcc), by
feature similarity and by instance label. The data folder is only read: the mask cache goes to
``--work``. A finished run in ``--work`` with the same training command is measured again without
training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from trace3d_ns.benchmarks.ablation import cpu_train_command, is_trained, train_runs

EXPERIMENT = "dtu"
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dtu_scan37"


@dataclass
class DtuConfig:
    """Schedule of the DTU run (sized for CPU training)."""

    steps: int = 2000
    num_downscales: int = 2
    """splatfacto's coarse-to-fine schedule: 1/4 resolution (100x75) first, 1/2 from ``resolution_schedule``."""
    resolution_schedule: int = 1000
    warmup: int = 300
    stop_split_at: int = 1500
    git_step: int = 800
    """Gaussian Instance Tracing and feature lifting start here."""
    contrastive_samples: int = 1024
    num_random: int = 10000
    """Random initial Gaussians (the scene has no seed points)."""
    random_scale: float = 2.0
    """Side of the cube they fill: the poses are kept as given (objects in the unit sphere, cameras
    at radius 2.5-3); nerfstudio's default recentring and splatfacto's default cube of side 10 put
    many of them at the cameras, as huge splats that make CPU steps take seconds."""
    train_seed: int = 42
    points: int = 3
    """Prompt points on the GT foreground (the union of their selections is scored)."""


def train_command(data: Path, work: Path, cfg: DtuConfig) -> List[str]:
    return [
        *cpu_train_command(data, work / "outputs", EXPERIMENT, "run", cfg.steps, cfg.train_seed),
        "--pipeline.model.num-downscales", str(cfg.num_downscales),
        "--pipeline.model.resolution-schedule", str(cfg.resolution_schedule),
        "--pipeline.model.warmup-length", str(cfg.warmup),
        "--pipeline.model.stop-split-at", str(cfg.stop_split_at),
        "--pipeline.git-step", str(cfg.git_step), "--pipeline.model.feature-start-step", str(cfg.git_step),
        "--pipeline.model.contrastive-samples", str(cfg.contrastive_samples),
        "--pipeline.model.num-random", str(cfg.num_random), "--pipeline.model.random-scale", str(cfg.random_scale),
        "--pipeline.datamanager.mask-source", "superpixel", "--pipeline.datamanager.cache-dir", str(work / "cache"),
        "--pipeline.density.cycles", "0",
        "nerfstudio-data", "--center-method", "none", "--auto-scale-poses", "False", "--orientation-method", "none",
    ]


@torch.no_grad()
def measure(config_path: Path, data: Path, points: int) -> Dict:
    """Foreground mIoU / mAcc by feature and by instance selection, and the run's size."""
    from nerfstudio.utils.eval_utils import eval_setup
    from trace3d_ns.evaluation.ground_truth import find_ground_truth, pipeline_views
    from trace3d_ns.evaluation.harness import Settings, evaluate

    _, pipeline, _, step = eval_setup(config_path, test_mode="test")
    model = pipeline.model
    model.eval()
    gt = find_ground_truth(data)
    train, test, missing = pipeline_views(pipeline, gt)
    out: Dict = {"step": step, "num_gaussians": model.num_points, "test_views": [v.name for v in test], "modes": {}}
    for mode in ("feature", "instance"):
        fg = evaluate(model, train, test, gt.has_objects, replace(Settings(), mode=mode, points=points))["foreground"]
        out["modes"][mode] = {k: fg[k] for k in ("miou", "macc", "reference_view", "prompts", "num_selected", "notes")}
    return out


def run_dtu_benchmark(work: Optional[Path] = None, data: Path = DEFAULT_DATA, cfg: Optional[DtuConfig] = None) -> Dict:
    cfg = cfg or DtuConfig()
    data = Path(data)
    if not (data / "transforms.json").is_file() or not (data / "gt_masks").is_dir():
        raise FileNotFoundError(f"{data} is not the DTU scan 37 scene (needs transforms.json and gt_masks/)")
    work = Path(work) if work is not None else Path.cwd() / "dtu_benchmark"
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    cmd = train_command(data, work, cfg)
    run = work / "outputs" / EXPERIMENT / "trace3d" / "run"
    trained = not is_trained(run, cfg.steps, cmd)
    if trained:
        train_runs({"dtu": cmd}, work, parallel=1, runs={"dtu": run})
    train_s = time.perf_counter() - start
    return {
        "config": asdict(cfg), "data": str(data), "work_dir": str(work), "trained": trained,
        "commands": {"train": " ".join(cmd)},
        **measure(run / "config.yml", data, cfg.points),
        "train_wall_s": train_s, "total_wall_s": time.perf_counter() - start,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.benchmarks.dtu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: ./dtu_benchmark)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the dtu_scan37 scene folder")
    parser.add_argument("--steps", type=int, default=DtuConfig.steps, help="training steps")
    args = parser.parse_args(argv)
    result = run_dtu_benchmark(args.work, args.data, DtuConfig(steps=args.steps))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({m: {k: r[k] for k in ("miou", "macc", "num_selected")} for m, r in result["modes"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
