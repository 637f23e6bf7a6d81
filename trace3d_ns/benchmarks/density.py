"""GIT-guided density control, measured: the same training with and without density control cycles.

    python -m trace3d_ns.benchmarks.density --out density.json [--work DIR]

Scene: ``trace3d-scene --views 32 --size 64 --sam-like-masks`` (28 training, 4 test views, 5
objects), copied once per run so the runs' mask caches are separate. Sizes are cut for a shared
2-core CPU: at 96 px with 4096 contrastive samples a training step with feature lifting took about
4 s here, at 64 px with 1024 samples about 0.3 s. Both runs are ``ns-train
trace3d`` on the CPU with the same seed and flags (:func:`train_command`), started side by side
with one thread each: RGB from step 0, splatfacto's densification from ``warmup`` to
``stop_split_at``, Gaussian Instance Tracing and feature lifting from ``git_step``; the density
control run adds ``cycles`` cycles every ``every`` steps from ``stop_split_at`` (the last one only
prunes). Up to the first cycle the two runs are the same computation.

Measured on each final checkpoint, loaded like ``ns-viewer`` / ``trace3d-eval`` load it
(``eval_setup``), with the same procedure for both:

- Gaussian counts;
- **ambiguous fraction**: the share of the Gaussians seen by a training view that are ambiguous
  (As > 0.5, gamma 0.8), against (a) the run's own consistent instances (the pipeline's tracing
  re-run on the final model: what density control acts on) and (b) the ground-truth instance maps
  of the training views (an objective "straddles two objects" measure);
- **object extraction** (``trace3d_ns.evaluation.harness``): per GT object, a point prompt on its
  best training view selects Gaussians, which are rendered alone on the test views: silhouette IoU
  against the GT mask and PSNR inside its padded box; by feature similarity (the default
  ``trace3d-eval`` mode) and by instance label (labels from the re-run tracing, so both runs'
  labels are equally fresh);
- **test-view PSNR** of the full render.

The density control run's per-cycle statistics (``density_control.json``) are included, and
``ns-export gaussian-splat`` is run on its checkpoint (changed number of Gaussians).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

BIN = Path(sys.executable).parent


@dataclass
class DensityBenchmarkConfig:
    """Scene and schedule (kept small: two CPU trainings on a shared 2-core machine)."""

    views: int = 32
    size: int = 64
    objects: int = 5
    scene_seed: int = 0
    train_seed: int = 42
    steps: int = 1000
    warmup: int = 200
    """splatfacto's warmup_length: its densification starts after this."""
    stop_split_at: int = 500
    """splatfacto's densification stops here; the first density control cycle runs here."""
    git_step: int = 300
    """Gaussian Instance Tracing and feature lifting start here (both runs)."""
    contrastive_samples: int = 1024
    """Pixels per step of the contrastive loss (the method's default is 4096)."""
    cycles: int = 4
    every: int = 125


def train_command(scene: Path, outputs: Path, name: str, cfg: DensityBenchmarkConfig, density: bool) -> List[str]:
    """The ``ns-train`` command of one run."""
    cycles = ["--pipeline.density.cycles", str(cfg.cycles), "--pipeline.density.start-step", str(cfg.stop_split_at),
              "--pipeline.density.every", str(cfg.every)] if density else ["--pipeline.density.cycles", "0"]
    return [
        str(BIN / "ns-train"), "trace3d", "--data", str(scene), "--output-dir", str(outputs),
        "--experiment-name", "density-bench", "--timestamp", name,
        "--machine.device-type", "cpu", "--machine.seed", str(cfg.train_seed), "--vis", "tensorboard",
        "--max-num-iterations", str(cfg.steps), "--steps-per-save", str(cfg.steps),
        "--steps-per-eval-image", "1000000", "--steps-per-eval-all-images", "1000000",
        "--pipeline.model.num-downscales", "0", "--pipeline.model.warmup-length", str(cfg.warmup),
        "--pipeline.model.stop-split-at", str(cfg.stop_split_at),
        "--pipeline.git-step", str(cfg.git_step), "--pipeline.model.feature-start-step", str(cfg.git_step),
        "--pipeline.model.contrastive-samples", str(cfg.contrastive_samples),
        "--pipeline.datamanager.mask-source", "folder", "--pipeline.datamanager.folder.directory", "sam_masks",
        *cycles,
    ]


def _ambiguous_fraction(traces, config) -> float:
    from trace3d_ns.git.ambiguity import ambiguity_scores

    score, seen = ambiguity_scores(traces, config)
    return float((score[seen > 0] > config.threshold).float().mean())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(torch.mean((a - b) ** 2)))


@torch.no_grad()
def measure_run(config_path: Path, scene: Path) -> Dict:
    """Counts, ambiguity, object extraction and test PSNR of one trained run (see the module docstring)."""
    from dataclasses import replace

    from nerfstudio.utils.eval_utils import eval_setup
    from trace3d_ns.evaluation.ground_truth import find_ground_truth, pipeline_views
    from trace3d_ns.evaluation.harness import Settings, evaluate
    from trace3d_ns.git.ambiguity import AmbiguityConfig
    from trace3d_ns.git.tracing import trace_model

    _, pipeline, _, step = eval_setup(config_path, test_mode="val")  # "val": training masks too
    model = pipeline.model
    model.eval()
    num_gaussians = model.num_points
    train, test, _ = pipeline_views(pipeline, find_ground_truth(scene))
    if len(train) != len(pipeline.datamanager.train_dataset):
        raise RuntimeError("every training view needs a ground-truth instance map")
    ambiguity = AmbiguityConfig(min_weight=pipeline.config.density.min_weight)

    result = pipeline.run_instance_tracing(step=step)  # fresh traces, consistent instances and labels
    consistent = model.instance_traces.remap_patches(result.patch_to_global)
    gt_maps = [torch.from_numpy(v.gt) for v in train]
    gt_traces = trace_model(model, pipeline.datamanager.train_dataset.cameras, gt_maps, pipeline.config.trace, progress=False)

    extraction = {}
    for mode in ("feature", "instance"):
        scores = evaluate(model, train, test, True, replace(Settings(), mode=mode))
        ext = scores["object_extraction"]
        extraction[mode] = {
            "mean_iou": ext["mean_iou"],
            "mean_psnr": ext["mean_psnr"],
            "num_objects": ext["num_objects"],
            "per_object": {k: {"iou": o["iou"], "psnr": o["psnr"], "selected": o["num_selected"]} for k, o in scores["objects"].items()},
        }
    psnrs = [_psnr(model.get_outputs_for_camera(v.camera)["rgb"].cpu(), v.image.cpu()) for v in test]
    return {
        "step": step,
        "num_gaussians": num_gaussians,
        "ambiguous_fraction_consistent": _ambiguous_fraction(consistent, ambiguity),
        "ambiguous_fraction_gt": _ambiguous_fraction(gt_traces, ambiguity),
        "num_instances": result.stats.num_instances,
        "object_extraction": extraction,
        "test_psnr": float(np.mean(psnrs)),
        "test_psnr_per_view": dict(zip([v.name for v in test], psnrs)),
    }


def _run(cmd: List[str], cwd: Path, log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as f:
        return subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=_single_thread_env())


def _single_thread_env() -> Dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_density_benchmark(work: Optional[Path] = None, cfg: Optional[DensityBenchmarkConfig] = None) -> Dict:
    """Generate the scene, train both runs side by side, measure both. Returns the JSON-ready result."""
    cfg = cfg or DensityBenchmarkConfig()
    work = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="trace3d-density-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()

    scene = work / "scene"
    scene_cmd = [str(BIN / "trace3d-scene"), "--out", str(scene), "--views", str(cfg.views), "--size", str(cfg.size),
                 "--objects", str(cfg.objects), "--seed", str(cfg.scene_seed), "--sam-like-masks", "--overwrite"]
    if _run(scene_cmd, work, work / "scene.log").returncode != 0:
        raise RuntimeError(f"trace3d-scene failed, see {work / 'scene.log'}")
    runs = {"density_control": True, "baseline": False}
    commands, procs = {}, {}
    for name, density in runs.items():
        run_scene = work / f"scene_{name}"  # separate mask caches for the concurrent runs
        shutil.rmtree(run_scene, ignore_errors=True)
        shutil.copytree(scene, run_scene)
        commands[name] = train_command(run_scene, work / "outputs", name, cfg, density)
        with (work / f"train_{name}.log").open("w") as log:
            procs[name] = subprocess.Popen(commands[name], cwd=work, stdout=log, stderr=subprocess.STDOUT, env=_single_thread_env())
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"ns-train ({name}) failed, see {work / f'train_{name}.log'}")
    train_s = time.perf_counter() - start

    out: Dict = {"config": asdict(cfg), "work_dir": str(work), "commands": {"scene": " ".join(scene_cmd)}}
    out["commands"].update({f"train_{k}": " ".join(v) for k, v in commands.items()})
    for name in runs:
        run_dir = work / "outputs" / "density-bench" / "trace3d" / name
        out[name] = measure_run(run_dir / "config.yml", work / f"scene_{name}")
    dc_dir = work / "outputs" / "density-bench" / "trace3d" / "density_control"
    out["density_control"]["cycles"] = json.loads((dc_dir / "density_control.json").read_text())
    export = [str(BIN / "ns-export"), "gaussian-splat", "--load-config", str(dc_dir / "config.yml"), "--output-dir", str(work / "export")]
    out["commands"]["export"] = " ".join(export)
    out["ns_export_after_density_control_ok"] = _run(export, work, work / "export.log").returncode == 0
    out["summary"] = _summary(out)
    out["train_wall_s"] = train_s
    out["total_wall_s"] = time.perf_counter() - start
    return out


def _summary(out: Dict) -> Dict:
    dc, base = out["density_control"], out["baseline"]

    def pair(get) -> Dict:
        return {"baseline": get(base), "density_control": get(dc)}

    first = dc["cycles"][0]
    return {
        "num_gaussians": pair(lambda r: r["num_gaussians"]),
        "ambiguous_fraction_consistent": pair(lambda r: r["ambiguous_fraction_consistent"]),
        "ambiguous_fraction_gt": pair(lambda r: r["ambiguous_fraction_gt"]),
        "ambiguous_fraction_at_first_cycle": first["ambiguous_fraction"],
        "object_iou_feature": pair(lambda r: r["object_extraction"]["feature"]["mean_iou"]),
        "object_psnr_feature": pair(lambda r: r["object_extraction"]["feature"]["mean_psnr"]),
        "object_iou_instance": pair(lambda r: r["object_extraction"]["instance"]["mean_iou"]),
        "object_psnr_instance": pair(lambda r: r["object_extraction"]["instance"]["mean_psnr"]),
        "test_psnr": pair(lambda r: r["test_psnr"]),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.benchmarks.density", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    result = run_density_benchmark(args.work)
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
