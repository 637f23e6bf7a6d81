"""The paper's Table-5 ablation, run here: the same training with Gaussian Instance Tracing's two
contributions switched on and off, measured the same way.

    python -m trace3d_ns.benchmarks.ablation --out ablation.json [--work DIR] [--variants a,b]

Variants (``VARIANTS``), all ``ns-train trace3d`` on the CPU with the same seed and schedule:

- ``no_git``: no Gaussian Instance Tracing; the features are lifted from the raw (view-inconsistent)
  SAM-like patches (``--pipeline.git-step -1``);
- ``density_only``: GIT runs, but only for GIT-guided density control; the features still learn
  from the raw patches (``--pipeline.use-consistent-labels False``);
- ``consistent_only``: the features learn from GIT's consistent instance maps; no density control
  (``--pipeline.density.cycles 0``);
- ``full``: both.

Scene: ``trace3d-scene --sam-like-masks`` (``AblationConfig``): its masks disagree across views the
way SAM's do (merged neighbours, parts, boundary jitter, missed small objects). Schedule: RGB from
step 0, splatfacto's densification from ``warmup`` to ``stop_split_at``, GIT and feature lifting
from ``git_step``, density control cycles from ``stop_split_at`` every ``every`` steps (the last one
only prunes). Runs go ``parallel`` at a time, one torch thread each. A run already in ``--work``
with its final checkpoint and the same training command (kept in its folder) is not trained again,
so measurements can be repeated.

Measured on each final checkpoint, loaded like ``trace3d-eval`` loads it (:func:`measure_run`):
Gaussian counts; the share of ambiguous Gaussians against the run's own consistent instances (the
pipeline's tracing re-run on the final model) and against the ground-truth instance maps (an
objective "straddles two objects" measure); ``trace3d_ns.evaluation.harness`` (object extraction:
IoU of the selection rendered alone, IoU of its visible part, PSNR in the box; novel-view 2D mIoU;
foreground mIoU / mAcc) with feature-similarity selection (the lifting that Table 5 compares), with
instance labels (from the re-run tracing, so every run's labels are equally fresh; for ``no_git``
that is GIT applied after training) and with labels from clustering the features
(``feature_clusters``); and the test-view PSNR of the full render.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

BIN = Path(sys.executable).parent
EXPERIMENT = "ablation"


@dataclass(frozen=True)
class Variant:
    """Which of GIT's contributions a run uses."""

    git: bool
    """Gaussian Instance Tracing runs during training."""
    consistent_labels: bool
    """The features learn from the consistent instance maps (else from the raw patches)."""
    density_control: bool
    """GIT-guided density control cycles run."""


VARIANTS: Dict[str, Variant] = {
    "no_git": Variant(git=False, consistent_labels=False, density_control=False),
    "density_only": Variant(git=True, consistent_labels=False, density_control=True),
    "consistent_only": Variant(git=True, consistent_labels=True, density_control=False),
    "full": Variant(git=True, consistent_labels=True, density_control=True),
}


@dataclass
class AblationConfig:
    """Scene and schedule (sized for CPU training on a 2-core machine)."""

    views: int = 32
    """Views of the generated scene (every 8th is a test view)."""
    size: int = 64
    """Image width and height in pixels."""
    objects: int = 5
    scene_seed: int = 0
    train_seed: int = 42
    steps: int = 1500
    warmup: int = 200
    """splatfacto's warmup_length: its densification starts after this."""
    stop_split_at: int = 600
    """splatfacto's densification stops here; the first density control cycle runs here."""
    git_step: int = 300
    """Gaussian Instance Tracing and feature lifting start here (runs with GIT; feature lifting in all)."""
    contrastive_samples: int = 1024
    """Pixels per step of the contrastive loss (the method's default is 4096)."""
    cycles: int = 4
    every: int = 200
    parallel: int = 2
    """Trainings run at the same time (one torch thread each)."""
    variants: List[str] = field(default_factory=lambda: list(VARIANTS))


def scene_command(scene: Path, cfg: AblationConfig) -> List[str]:
    return [str(BIN / "trace3d-scene"), "--out", str(scene), "--views", str(cfg.views), "--size", str(cfg.size),
            "--objects", str(cfg.objects), "--seed", str(cfg.scene_seed), "--sam-like-masks", "--overwrite"]


def cpu_train_command(data: Path, outputs: Path, experiment: str, name: str, steps: int, seed: int) -> List[str]:
    """The part of a benchmark's ``ns-train trace3d`` command every benchmark shares: CPU, seed,
    tensorboard, one checkpoint at the end, no evaluation during training."""
    return [
        str(BIN / "ns-train"), "trace3d", "--data", str(data), "--output-dir", str(outputs),
        "--experiment-name", experiment, "--timestamp", name,
        "--machine.device-type", "cpu", "--machine.seed", str(seed), "--vis", "tensorboard",
        "--max-num-iterations", str(steps), "--steps-per-save", str(steps),
        "--steps-per-eval-image", "1000000", "--steps-per-eval-all-images", "1000000",
    ]


def train_command(scene: Path, work: Path, name: str, cfg: AblationConfig, variant: Variant) -> List[str]:
    """The ``ns-train`` command of one run (its mask cache in ``work/cache_<name>``)."""
    flags = [
        "--pipeline.git-step", str(cfg.git_step) if variant.git else "-1",
        "--pipeline.use-consistent-labels", str(variant.consistent_labels),
    ]
    if variant.density_control:
        flags += ["--pipeline.density.cycles", str(cfg.cycles), "--pipeline.density.start-step", str(cfg.stop_split_at),
                  "--pipeline.density.every", str(cfg.every)]
    else:
        flags += ["--pipeline.density.cycles", "0"]
    return [
        *cpu_train_command(scene, work / "outputs", EXPERIMENT, name, cfg.steps, cfg.train_seed),
        "--pipeline.model.num-downscales", "0", "--pipeline.model.warmup-length", str(cfg.warmup),
        "--pipeline.model.stop-split-at", str(cfg.stop_split_at),
        "--pipeline.model.feature-start-step", str(cfg.git_step),
        "--pipeline.model.contrastive-samples", str(cfg.contrastive_samples),
        "--pipeline.datamanager.mask-source", "folder", "--pipeline.datamanager.folder.directory", "sam_masks",
        "--pipeline.datamanager.cache-dir", str(work / f"cache_{name}"),
        *flags,
    ]


def run_dir(work: Path, name: str) -> Path:
    return work / "outputs" / EXPERIMENT / "trace3d" / name


def _ambiguous_fraction(traces, config) -> float:
    from trace3d_ns.git.ambiguity import ambiguity_scores

    score, seen = ambiguity_scores(traces, config)
    return float((score[seen > 0] > config.threshold).float().mean())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(torch.mean((a - b) ** 2)))


def _extraction_record(scores: Dict) -> Dict:
    ext = scores["object_extraction"]
    return {
        "mean_iou": ext["mean_iou"],
        "mean_iou_visible": ext["mean_iou_visible"],
        "mean_psnr": ext["mean_psnr"],
        "novel_view_miou": scores["novel_view_segmentation"]["miou"],
        "foreground_miou": scores["foreground"]["miou"],
        "foreground_macc": scores["foreground"]["macc"],
        "num_objects": ext["num_objects"],
        "per_object": {k: {"iou": o["iou"], "iou_visible": o["iou_visible"], "psnr": o["psnr"], "selected": o["num_selected"]}
                       for k, o in scores["objects"].items()},
    }


@torch.no_grad()
def measure_run(config_path: Path, scene: Path) -> Dict:
    """Counts, ambiguity, the evaluation harness's metrics and test PSNR of one trained run."""
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

    selection = {mode: _extraction_record(evaluate(model, train, test, True, replace(Settings(), mode=mode)))
                 for mode in ("feature", "instance")}
    start = time.perf_counter()
    num_clusters = int(pipeline.label_from_features().max())  # labels from the features instead of GIT
    cluster_s = time.perf_counter() - start
    selection["feature_clusters"] = _extraction_record(evaluate(model, train, test, True, replace(Settings(), mode="instance")))
    selection["feature_clusters"].update(num_clusters=num_clusters, clustering_s=cluster_s)
    psnrs = [_psnr(model.get_outputs_for_camera(v.camera)["rgb"].cpu(), v.image.cpu()) for v in test]
    return {
        "step": step,
        "num_gaussians": num_gaussians,
        "ambiguous_fraction_consistent": _ambiguous_fraction(consistent, ambiguity),
        "ambiguous_fraction_gt": _ambiguous_fraction(gt_traces, ambiguity),
        "num_instances": result.stats.num_instances,
        "selection": selection,
        "test_psnr": float(np.mean(psnrs)),
        "test_psnr_per_view": dict(zip([v.name for v in test], psnrs)),
    }


def single_thread_env() -> Dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_logged(cmd: List[str], cwd: Path, log: Path) -> None:
    with log.open("w") as f:
        if subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=single_thread_env()).returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed, see {log}")


def command_record(run: Path) -> Path:
    """Where the command that trained ``run`` (a run folder) is kept."""
    return run / "train_command.txt"


def is_trained(run: Path, steps: int, command: List[str]) -> bool:
    """True when ``run`` has its final checkpoint and was trained by exactly ``command`` (a finished
    run is reused only for the same settings; a changed command trains again)."""
    record = command_record(run)
    checkpoint = run / "nerfstudio_models" / f"step-{steps - 1:09d}.ckpt"
    return checkpoint.is_file() and record.is_file() and record.read_text() == " ".join(command)


def train_runs(commands: Dict[str, List[str]], work: Path, parallel: int, runs: Dict[str, Path]) -> None:
    """Run the training commands, ``parallel`` at a time, and record each finished run's command in
    its folder (``runs[name]``); raises naming the log of a failed run."""
    pending, running = list(commands), {}
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            log = (work / f"train_{name}.log").open("w")
            running[name] = (subprocess.Popen(commands[name], cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                              env=single_thread_env()), log)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.kill()
                raise RuntimeError(f"ns-train ({name}) failed, see {work / f'train_{name}.log'}")
            command_record(runs[name]).write_text(" ".join(commands[name]))
        time.sleep(1.0)


def run_ablation(work: Optional[Path] = None, cfg: Optional[AblationConfig] = None) -> Dict:
    """Generate the scene, train the variants (those not trained yet), measure them. JSON-ready result."""
    cfg = cfg or AblationConfig()
    unknown = sorted(set(cfg.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {sorted(VARIANTS)}")
    work = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="trace3d-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()

    scene = work / "scene"
    commands = {"scene": scene_command(scene, cfg)}
    if not (scene / "transforms.json").is_file():
        run_logged(commands["scene"], work, work / "scene.log")
    train = {name: train_command(scene, work, name, cfg, VARIANTS[name]) for name in cfg.variants}
    commands.update({f"train_{k}": v for k, v in train.items()})
    todo = {k: v for k, v in train.items() if not is_trained(run_dir(work, k), cfg.steps, v)}
    train_runs(todo, work, cfg.parallel, {k: run_dir(work, k) for k in todo})
    train_s = time.perf_counter() - start

    out: Dict = {"config": asdict(cfg), "work_dir": str(work), "trained": sorted(todo),
                 "commands": {k: " ".join(v) for k, v in commands.items()}, "runs": {}}
    for name in cfg.variants:
        out["runs"][name] = {"variant": asdict(VARIANTS[name]), **measure_run(run_dir(work, name) / "config.yml", scene)}
        cycles = run_dir(work, name) / "density_control.json"
        if cycles.is_file():
            out["runs"][name]["density_cycles"] = json.loads(cycles.read_text())
    out["summary"] = summary(out["runs"])
    out["train_wall_s"] = train_s
    out["total_wall_s"] = time.perf_counter() - start
    return out


SUMMARY_FIELDS = {
    "num_gaussians": lambda r: r["num_gaussians"],
    "ambiguous_fraction_consistent": lambda r: r["ambiguous_fraction_consistent"],
    "ambiguous_fraction_gt": lambda r: r["ambiguous_fraction_gt"],
    "object_iou_feature": lambda r: r["selection"]["feature"]["mean_iou"],
    "object_iou_visible_feature": lambda r: r["selection"]["feature"]["mean_iou_visible"],
    "object_psnr_feature": lambda r: r["selection"]["feature"]["mean_psnr"],
    "object_iou_instance": lambda r: r["selection"]["instance"]["mean_iou"],
    "object_iou_visible_instance": lambda r: r["selection"]["instance"]["mean_iou_visible"],
    "object_psnr_instance": lambda r: r["selection"]["instance"]["mean_psnr"],
    "object_iou_visible_feature_clusters": lambda r: r["selection"]["feature_clusters"]["mean_iou_visible"],
    "test_psnr": lambda r: r["test_psnr"],
}


def summary(runs: Dict[str, Dict]) -> Dict[str, Dict[str, float]]:
    """Headline numbers: field -> variant -> value."""
    return {key: {name: get(run) for name, run in runs.items()} for key, get in SUMMARY_FIELDS.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.benchmarks.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary folder)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=AblationConfig.steps, help="training steps per run")
    args = parser.parse_args(argv)
    cfg = AblationConfig(steps=args.steps, variants=[v for v in args.variants.split(",") if v])
    result = run_ablation(args.work, cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
