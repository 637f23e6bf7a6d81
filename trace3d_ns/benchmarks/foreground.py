"""Foreground segmentation on real scenes with NVOS's metrics: DTU scan 37 (``gt_masks/``, the
objects on the bricks) and the Blender LEGO (alpha), from ``../shared/data``.

    python -m trace3d_ns.benchmarks.foreground --scene dtu_scan37|lego --out FILE.json [--work DIR]

One ``ns-train trace3d`` run per scene on the CPU with weights-free masks (``superpixel``:
Felzenszwalb segments at two scales stand in for SAM, whose weights cannot be downloaded here),
then ``trace3d_ns.evaluation.harness`` on its test views: ``points`` prompt points spread over the
GT foreground of one training view, the union of their selections, its visible silhouette scored
per test view (mIoU, mAcc), by feature similarity, by instance label and by feature cluster. The
data folder is only read: the mask cache goes to ``--work``. A finished run in ``--work`` with the
same training command is measured again without training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from trace3d_ns.benchmarks.ablation import cpu_train_command, is_trained, train_runs

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass
class ForegroundConfig:
    """One scene's run (sized for CPU training)."""

    experiment: str = "dtu"
    """ns-train's experiment name (the run folder is ``<work>/outputs/<experiment>/trace3d/run``)."""
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
    points: int = 16
    """Prompt points spread over the GT foreground (the union of their selections is scored): NVOS
    prompts with scribbles; with part-level instances (superpixel masks split objects into parts in
    every view, so tracing keeps the parts apart) a few points select only the parts under them."""
    mask_flags: List[str] = field(default_factory=list)
    """Extra mask-source flags."""
    dataparser: List[str] = field(default_factory=list)
    """Dataparser subcommand and its flags, appended to ``ns-train``."""
    needs: List[str] = field(default_factory=list)
    """Files or folders the scene folder must hold."""


SCENES: Dict[str, ForegroundConfig] = {
    # 49 views 400x300: 1/4 then 1/2 resolution; poses as given (see random_scale)
    "dtu_scan37": ForegroundConfig(
        dataparser=["nerfstudio-data", "--center-method", "none", "--auto-scale-poses", "False", "--orientation-method", "none"],
        needs=["transforms.json", "gt_masks"],
    ),
    # 100 train views 200x200 RGBA, 1/2 resolution throughout. The RGBA images are kept (no
    # --alpha-color): splatfacto composites them on its random background, so empty space stays empty
    # (composited on white, all Gaussians together covered the object with IoU 0.32). A third, coarse
    # superpixel level stands in for SAM's whole-object masks: on r_0, scale 2000 gives a segment with
    # IoU 0.92 against the alpha, the default scales' best are 0.11 (100) and 0.20 (500)
    "lego": ForegroundConfig(
        experiment="lego", steps=1500, num_downscales=1, resolution_schedule=3000, git_step=600, stop_split_at=1200,
        mask_flags=["--pipeline.datamanager.superpixel.scales", "100", "500", "2000"],
        dataparser=["blender-data", "--alpha-color", "None"], needs=["transforms_train.json", "transforms_test.json"],
    ),
}


def train_command(data: Path, work: Path, cfg: ForegroundConfig) -> List[str]:
    return [
        *cpu_train_command(data, work / "outputs", cfg.experiment, "run", cfg.steps, cfg.train_seed),
        "--pipeline.model.num-downscales", str(cfg.num_downscales),
        "--pipeline.model.resolution-schedule", str(cfg.resolution_schedule),
        "--pipeline.model.warmup-length", str(cfg.warmup),
        "--pipeline.model.stop-split-at", str(cfg.stop_split_at),
        "--pipeline.git-step", str(cfg.git_step), "--pipeline.model.feature-start-step", str(cfg.git_step),
        "--pipeline.model.contrastive-samples", str(cfg.contrastive_samples),
        "--pipeline.model.num-random", str(cfg.num_random), "--pipeline.model.random-scale", str(cfg.random_scale),
        "--pipeline.datamanager.mask-source", "superpixel", *cfg.mask_flags,
        "--pipeline.datamanager.cache-dir", str(work / "cache"),
        "--pipeline.density.cycles", "0",
        *cfg.dataparser,
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
    keys = ("miou", "macc", "reference_view", "prompts", "num_selected", "notes")
    for mode in ("feature", "instance"):
        fg = evaluate(model, train, test, gt.has_objects, replace(Settings(), mode=mode, points=points))["foreground"]
        out["modes"][mode] = {k: fg[k] for k in keys}
    pipeline.label_from_features()
    fg = evaluate(model, train, test, gt.has_objects, replace(Settings(), mode="instance", points=points))["foreground"]
    out["modes"]["feature_clusters"] = {k: fg[k] for k in keys}
    return out


def run_foreground_benchmark(
    scene: str, work: Optional[Path] = None, data: Optional[Path] = None, cfg: Optional[ForegroundConfig] = None
) -> Dict:
    """Train (unless finished in ``work``) and measure one of ``SCENES``; JSON-ready result."""
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; known: {sorted(SCENES)}")
    cfg = cfg or SCENES[scene]
    data = Path(data) if data is not None else SHARED_DATA / scene
    missing = [n for n in cfg.needs if not (data / n).exists()]
    if missing:
        raise FileNotFoundError(f"{data} is not the {scene} scene (missing {', '.join(missing)})")
    work = (Path(work) if work is not None else Path.cwd() / f"{scene}_benchmark").resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    cmd = train_command(data, work, cfg)
    run = work / "outputs" / cfg.experiment / "trace3d" / "run"
    trained = not is_trained(run, cfg.steps, cmd)
    if trained:
        train_runs({scene: cmd}, work, parallel=1, runs={scene: run})
    train_s = time.perf_counter() - start
    return {
        "scene": scene, "config": asdict(cfg), "data": str(data), "work_dir": str(work), "trained": trained,
        "commands": {"train": " ".join(cmd)},
        **measure(run / "config.yml", data, cfg.points),
        "train_wall_s": train_s, "total_wall_s": time.perf_counter() - start,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.benchmarks.foreground", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scene", choices=sorted(SCENES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: ./<scene>_benchmark)")
    parser.add_argument("--data", type=Path, default=None, help="the scene folder (default: ../shared/data/<scene>)")
    args = parser.parse_args(argv)
    result = run_foreground_benchmark(args.scene, args.work, args.data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({m: {k: r[k] for k in ("miou", "macc", "num_selected")} for m, r in result["modes"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
