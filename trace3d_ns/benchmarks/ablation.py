"""The paper's Table-5 ablation, run where object boundaries matter: Gaussian Instance Tracing's two
contributions switched on and off, on cluttered generated scenes, several seeds, scored as 3D
extraction.

    trace3d-bench ablation --out ablation.json [--work DIR] [--steps N] [--size S] [--seeds 0,1,2]
    python -m trace3d_ns.benchmarks.ablation --out ablation.json [same flags]

The defaults (``AblationConfig``) are the benchmark; the flags exist for smoke runs.

Variants (``VARIANTS``), all ``ns-train trace3d`` on the CPU with the same scene, seed and schedule:

- ``no_git``: no Gaussian Instance Tracing; the features are lifted from the raw (view-inconsistent)
  SAM-like patches (``--pipeline.git-step -1``);
- ``density_only``: GIT runs, but only for GIT-guided density control; the features still learn
  from the raw patches (``--pipeline.use-consistent-labels False``);
- ``consistent_only``: the features learn from GIT's consistent instance maps; no density control
  (``--pipeline.density.cycles 0``);
- ``full``: both.

**Scene** (chosen once, the same for every variant and seed but the seed): ``trace3d-scene --clutter
--sam-like-masks``, 10 objects that touch, stack and lean on each other (some sharing a texture
across the contact, tables and lamps with thin parts), 160 px, 40 views with every 5th held out
(8 test views); masks that disagree across views like SAM's (merged neighbours, parts, missed small
objects, boundary jitter). Seed ``s`` generates the scene (``--seed s``) and seeds the training
(``--machine.seed s``), so every seed is a new scene and the variants of one seed are paired.

**Schedule**, as fractions of the steps (``Schedule``), after the authors' release (NOTES.md,
"The authors' release": RGB training 30k iterations, patch merging, density control "4 cycles, 1200
iterations apart, inside a 9000-iteration RGB fine-tune", then contrastive lifting 20k iterations):

- 0-50%: the RGB stage; splatfacto's densification from 5% to 25% (half of the RGB stage, as the
  splatfacto / 3DGS defaults densify for the first half of their 30k steps);
- 50%: Gaussian Instance Tracing: consistent instance maps (runs with GIT);
- 50-70%: the density-control fine-tune, RGB only: 4 cycles at 50, 56, 62 and 68% (the last one only
  prunes; each cycle re-traces and re-merges), so the children train 6% of the steps (300 of 5000)
  before the next cycle judges them;
- 70-100%: contrastive feature lifting on the final Gaussians (the features never move the
  geometry; RGB keeps training).

The RGB stage is the same for every variant (their flags act from 50% on), so it is trained once
per seed (``rgb_stage_s<seed>``) and every variant continues from its last checkpoint
(``--load-checkpoint``, as a user fine-tunes a trained model): the variants of a seed start the
GIT stage from the same Gaussians, and the 12 runs train 7.5 runs' steps.

Runs go ``parallel`` at a time, one torch thread each (a variant once its RGB stage is finished).
A run already in ``--work`` with its final checkpoint and the same training command (kept in its
folder) is not trained again, unless its RGB stage trains again; a scene made by another command is
generated again, and its runs trained again.

**Measured** on each final checkpoint (``parallel`` runs at a time, one process each), loaded like ``trace3d-eval`` loads it (:func:`measure_run`):
``trace3d_ns.evaluation.harness`` with feature-similarity selection (the lifting Table 5 compares):
``object_iou_amodal`` and ``object_biou`` (the selection rendered alone against the object ray cast
alone, on every test view where it is in frame), ``novel_view_miou``, ``test_psnr``, and the modal
scores; the same with instance-label selection (from GIT re-run on the final model, so ``no_git``
there is GIT applied after training); Gaussian counts; the share of ambiguous Gaussians against the
run's own consistent instances and against the ground-truth instance maps; the density control
cycles' statistics. The JSON's ``summary.<variant>.<metric>`` holds ``mean``, ``std`` (sample
standard deviation over the seeds) and the per-seed ``values``; ``delta_vs_no_git`` the same for the
per-seed differences to ``no_git``. One picture per variant (``pictures``, first seed): the ground
truth against the extracted objects (:mod:`trace3d_ns.benchmarks.pictures`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Sequence

import numpy as np
import torch

BIN = Path(sys.executable).parent
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The folder holding the ``trace3d_ns`` that runs the benchmark: its subprocesses (``ns-train``,
``trace3d-scene``) import that one too, not whichever copy the environment installed."""
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


@dataclass(frozen=True)
class Schedule:
    """Training steps of each stage, derived from the total (see the module docstring)."""

    steps: int
    warmup: int
    """splatfacto's warmup_length: its densification starts after this."""
    stop_split_at: int
    """splatfacto's densification stops here."""
    git_step: int
    """Gaussian Instance Tracing (consistent maps) and the first density control cycle."""
    cycles: int
    every: int
    """Steps between density control cycles."""
    feature_start: int
    """Contrastive feature lifting starts here."""

    @classmethod
    def of(cls, steps: int, cycles: int = 4) -> Schedule:
        """The ablation's schedule for ``steps`` training steps."""
        if steps < 20:
            raise ValueError(f"the ablation needs at least 20 steps, got {steps}")
        return cls(
            steps=steps,
            warmup=max(1, round(0.05 * steps)),
            stop_split_at=round(0.25 * steps),
            git_step=round(0.5 * steps),
            cycles=cycles,
            every=max(1, round(0.06 * steps)),
            feature_start=round(0.7 * steps),
        )

    def cycle_steps(self) -> List[int]:
        return [self.git_step + k * self.every for k in range(self.cycles)]


@dataclass
class AblationConfig:
    """Scene, training length and seeds; the defaults are the benchmark (fixed before measuring)."""

    views: int = 40
    """Views of each generated scene."""
    test_every: int = 5
    """Every ``test_every``-th view is a test view."""
    size: int = 160
    """Image width and height in pixels."""
    objects: int = 10
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    """Seed s: scene ``--seed s`` and training ``--machine.seed s``."""
    steps: int = 5000
    contrastive_samples: int = 1024
    """Pixels per step of the contrastive loss (the method's default is 4096). Its cost is quadratic:
    forward + backward on one loaded CPU thread took 0.17 s at 1024, 0.8 s at 2048, 4.5 s at 4096."""
    parallel: int = 2
    """Trainings run at the same time (one torch thread each)."""
    variants: List[str] = field(default_factory=lambda: list(VARIANTS))
    picture_objects: int = 4
    """Objects shown in each variant's picture."""

    @property
    def schedule(self) -> Schedule:
        return Schedule.of(self.steps)


def ablation_config(**overrides) -> AblationConfig:
    """``AblationConfig`` with the given fields replaced (None values are ignored); checks them."""
    cfg = AblationConfig(**{k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(cfg.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {sorted(VARIANTS)}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or min(cfg.seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {cfg.seeds}")
    cfg.schedule  # raises for too few steps
    return cfg


def scene_dir(work: Path, seed: int) -> Path:
    return work / f"scene_s{seed}"


def scene_command(scene: Path, cfg: AblationConfig, seed: int) -> List[str]:
    return [str(BIN / "trace3d-scene"), "--out", str(scene), "--views", str(cfg.views), "--test-every",
            str(cfg.test_every), "--size", str(cfg.size), "--objects", str(cfg.objects), "--seed", str(seed),
            "--clutter", "--sam-like-masks", "--overwrite"]


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


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_s{seed}"


RGB_STAGE = Variant(git=False, consistent_labels=False, density_control=False)
"""What the shared RGB stage trains (every variant's flags act from ``git_step`` on)."""


def rgb_stage_name(seed: int) -> str:
    """The run that trains seed ``seed``'s RGB stage, from which its variants continue."""
    return f"rgb_stage_s{seed}"


def rgb_stage_checkpoint(work: Path, cfg: AblationConfig, seed: int) -> Path:
    """The RGB stage's last checkpoint (step ``git_step - 1``): where every variant of ``seed`` starts."""
    return run_dir(work, rgb_stage_name(seed)) / "nerfstudio_models" / f"step-{cfg.schedule.git_step - 1:09d}.ckpt"


def rgb_stage_command(scene: Path, work: Path, cfg: AblationConfig, seed: int) -> List[str]:
    """The ``ns-train`` command of seed ``seed``'s RGB stage: steps ``0 .. git_step - 1`` of the schedule."""
    return train_command(scene, work, rgb_stage_name(seed), cfg, RGB_STAGE, seed, stage="rgb")


def train_command(
    scene: Path, work: Path, name: str, cfg: AblationConfig, variant: Variant, seed: int = 0,
    stage: Literal["all", "rgb", "after_rgb"] = "all",
) -> List[str]:
    """The ``ns-train`` command of one run (its mask cache in ``work/cache_<name>``). ``stage``: all
    steps; the RGB stage only (steps before ``git_step``); or the rest, continued from seed's RGB
    stage checkpoint (``--load-checkpoint``, as a user fine-tunes a trained model)."""
    s = cfg.schedule
    flags = [
        "--pipeline.git-step", str(s.git_step) if variant.git else "-1",
        "--pipeline.use-consistent-labels", str(variant.consistent_labels),
    ]
    if variant.density_control:
        flags += ["--pipeline.density.cycles", str(s.cycles), "--pipeline.density.start-step", str(s.git_step),
                  "--pipeline.density.every", str(s.every)]
    else:
        flags += ["--pipeline.density.cycles", "0"]
    steps = {"all": cfg.steps, "rgb": s.git_step, "after_rgb": cfg.steps - s.git_step}[stage]
    if stage == "after_rgb":
        flags += ["--load-checkpoint", str(rgb_stage_checkpoint(work, cfg, seed))]
    return [
        *cpu_train_command(scene, work / "outputs", EXPERIMENT, name, steps, seed),
        "--pipeline.model.num-downscales", "0", "--pipeline.model.warmup-length", str(s.warmup),
        "--pipeline.model.stop-split-at", str(s.stop_split_at),
        "--pipeline.model.feature-start-step", str(s.feature_start),
        "--pipeline.model.contrastive-samples", str(cfg.contrastive_samples),
        "--pipeline.datamanager.mask-source", "folder", "--pipeline.datamanager.folder.directory", "sam_masks",
        "--pipeline.datamanager.cache-dir", str(work / f"cache_{name}"),
        *flags,
    ]


def run_dir(work: Path, name: str) -> Path:
    return work / "outputs" / EXPERIMENT / "trace3d" / name


# ---- measuring ----------------------------------------------------------------------------------
def _ambiguous_fraction(traces, config) -> float:
    from trace3d_ns.git.ambiguity import ambiguity_scores

    score, seen = ambiguity_scores(traces, config)
    return float((score[seen > 0] > config.threshold).float().mean())


def _selection_record(scores: Dict, objects: Dict[str, Dict]) -> Dict:
    """The headline metrics and per-object scores of one ``evaluate`` result."""
    ext = scores["object_extraction"]
    return {
        **scores["metrics"],
        "object_iou": ext["mean_iou"],
        "object_iou_visible": ext["mean_iou_visible"],
        "object_psnr": ext["mean_psnr"],
        "foreground_miou": scores["foreground"]["miou"],
        "foreground_macc": scores["foreground"]["macc"],
        "num_objects": ext["num_objects_amodal"],
        "per_object": {
            k: {"iou_amodal": o["iou_amodal"], "biou": o["biou"], "iou": o["iou"], "iou_visible": o["iou_visible"],
                "selected": o["num_selected"], **objects.get(k, {})}
            for k, o in scores["objects"].items()
        },
    }


@torch.no_grad()
def oracle_extraction(model, labels: torch.Tensor, test) -> Dict:
    """Extraction from perfect labels: each object's selection is the Gaussians whose traced
    ground-truth majority (``InstanceTraces.majority_labels`` of the GT maps) is that object, scored as
    the selections are (amodal IoU and boundary IoU on the test views). What a selection from these
    Gaussians can reach at best with whole-Gaussian assignment: the gap to 1 is Gaussians that
    straddle objects or lie hidden where training never saw them, not labels or features."""
    from trace3d_ns.evaluation.harness import _mean, evaluate_amodal

    ids = sorted({int(i) for v in test if v.amodal is not None for i in v.amodal})
    per_object = {}
    for object_id in ids:
        views = evaluate_amodal(model, labels.to(model.device) == object_id, object_id, test)
        if views:
            per_object[str(object_id)] = {"iou_amodal": _mean([s["iou"] for s in views.values()]),
                                          "biou": _mean([s["biou"] for s in views.values()])}
    return {
        "object_iou_amodal": _mean([o["iou_amodal"] for o in per_object.values()]),
        "object_biou": _mean([o["biou"] for o in per_object.values()]),
        "per_object": per_object,
    }


@torch.no_grad()
def measure_run(config_path: Path, scene: Path, picture: Optional[Path] = None, picture_objects: int = 4) -> Dict:
    """Counts, ambiguity and the evaluation harness's metrics of one trained run (and its picture)."""
    from nerfstudio.utils.eval_utils import eval_setup
    from trace3d_ns.benchmarks.pictures import extraction_picture, picture_subjects
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
    meta = json.loads((scene / "scene.json").read_text())
    objects = {str(o["id"]): {"shape": o["shape"], "role": o["role"]} for o in meta["objects"]}
    density = pipeline.config.density
    ambiguity = AmbiguityConfig(gamma=density.gamma, threshold=density.theta_as, min_weight=density.min_weight)

    result = pipeline.run_instance_tracing(step=step)  # fresh traces, consistent instances and labels
    consistent = model.instance_traces.remap_patches(result.patch_to_global)
    gt_maps = [torch.from_numpy(v.gt) for v in train]
    gt_traces = trace_model(model, pipeline.datamanager.train_dataset.cameras, gt_maps, pipeline.config.trace, progress=False)

    settings = {mode: Settings(mode=mode) for mode in ("feature", "instance", "traced", "feature_instance")}
    selection = {mode: _selection_record(evaluate(model, train, test, True, s), objects) for mode, s in settings.items()}
    out = {
        "oracle": oracle_extraction(model, gt_traces.majority_labels(), test),
        "step": step,
        "num_gaussians": num_gaussians,
        "ambiguous_fraction_consistent": _ambiguous_fraction(consistent, ambiguity),
        "ambiguous_fraction_gt": _ambiguous_fraction(gt_traces, ambiguity),
        "num_instances": result.stats.num_instances,
        "selection": selection,
    }
    if picture is not None:
        view, ids = picture_subjects(test, meta, picture_objects)
        extraction_picture(model, train, view, ids, settings["feature"], picture, title=config_path.parent.name)
        out["picture"] = str(picture)
    return out


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of every source file of the package as this process found it (once: the code it loaded),
    so that a measurement is reused only under the same code."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _measure_key(args: tuple) -> str:
    """What a run's measurement depends on: the run (its command record), the arguments, the code."""
    config_path = Path(args[0])
    record = command_record(config_path.parent)
    text = record.read_text() if record.is_file() else ""
    return hashlib.sha1(json.dumps([text, [str(a) for a in args], code_fingerprint()]).encode()).hexdigest()


def _measured_file(args: tuple) -> Path:
    return Path(args[0]).parent / "measured.json"


def _measure_cached(args: tuple) -> Dict:
    """:func:`measure_run`, or the measurement kept in the run folder when it was made of the same
    run, with the same arguments and code (its picture, if any, is drawn again when missing)."""
    cached, key = _measured_file(args), _measure_key(args)
    if cached.is_file():
        kept = json.loads(cached.read_text())
        picture = kept["result"].get("picture")
        if kept.get("key") == key and (picture is None or Path(picture).is_file()):
            return kept["result"]
    result = measure_run(*args)
    cached.write_text(json.dumps({"key": key, "result": result}) + "\n")
    return result


def _measure_in_worker(kernel_threads: int, args: tuple) -> Dict:
    import numba

    torch.set_num_threads(1)
    numba.set_num_threads(min(kernel_threads, numba.config.NUMBA_NUM_THREADS))
    return _measure_cached(args)


def measure_runs(jobs: Dict, parallel: int = 1) -> Dict:
    """:func:`measure_run` of every job (key -> its arguments), ``parallel`` at a time in fresh
    processes (each run's measuring is one thread; alone they leave the other cores idle). Results by
    key; a run measured before under the same code is not measured again (``<run>/measured.json``)."""
    if parallel <= 1 or len(jobs) <= 1:
        return {key: _measure_cached(args) for key, args in jobs.items()}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        threads = max(1, (os.cpu_count() or 1) // parallel)  # the compiled kernels' threads, shared
        futures = {key: pool.submit(_measure_in_worker, threads, args) for key, args in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


# ---- running ------------------------------------------------------------------------------------
def single_thread_env(parallel: int = 1) -> Dict[str, str]:
    """Environment of a benchmark subprocess: one torch thread (many small ops run fastest on one),
    the compiled kernels' threads shared among the ``parallel`` runs (one each when two run on
    two cores: more would only make them take turns), and this benchmark's own package first on
    the import path (see ``PACKAGE_ROOT``)."""
    kernel_threads = max(1, (os.cpu_count() or 1) // max(1, parallel))
    path = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": str(kernel_threads),
            "PYTHONPATH": path}


def run_logged(cmd: List[str], cwd: Path, log: Path) -> None:
    with log.open("w") as f:
        if subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=single_thread_env()).returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed, see {log}")


def command_record(run: Path) -> Path:
    """Where the command that trained ``run`` (a run folder) is kept."""
    return run / "train_command.txt"


def method_fingerprint() -> str:
    """Hash of the method's default pipeline settings (model, merging, density control, tracing...):
    a command leaves most of them at their defaults, so a run trained before a default changed is not
    the same run even though its command is."""
    from trace3d_ns.config import trace3d_trainer_config

    return hashlib.sha1(repr(trace3d_trainer_config().pipeline).encode("utf-8")).hexdigest()[:16]


def command_text(command: List[str]) -> str:
    """A command as the records hold it: the executable by name, so that a run or scene is
    recognised whichever virtual environment (path) launched it."""
    return " ".join([Path(command[0]).name, *command[1:]])


def run_record(command: List[str], start: Optional[Path] = None) -> str:
    """What ``command_record`` holds for a run trained by ``command`` under today's defaults; for a
    run continued from the run folder ``start``, that run's record too (a retrained start retrains it)."""
    text = command_text(command) + f"\n# method defaults {method_fingerprint()}\n"
    if start is not None:
        recorded = command_record(start)
        text += "# continued from " + (recorded.read_text() if recorded.is_file() else "an unrecorded run\n")
    return text


def is_trained(run: Path, steps: int, command: List[str], start: Optional[Path] = None) -> bool:
    """True when ``run`` has its checkpoint of step ``steps - 1`` and was trained by exactly
    ``command`` under the same method defaults (and continued from ``start`` as it is now): a
    finished run is reused only for the same settings; a changed command or default trains again."""
    record = command_record(run)
    checkpoint = run / "nerfstudio_models" / f"step-{steps - 1:09d}.ckpt"
    return checkpoint.is_file() and record.is_file() and record.read_text() == run_record(command, start)


def train_runs(
    commands: Dict[str, List[str]], work: Path, parallel: int, runs: Dict[str, Path],
    after: Optional[Dict[str, Path]] = None,
) -> Dict[str, float]:
    """Run the training commands, ``parallel`` at a time, in order except that a run continued from
    another run folder (``after[name]``) waits until that one is finished when it is among
    ``runs``; record each finished run's command in its folder (``runs[name]``). Raises naming the
    log of a failed run. Returns each run's wall time (s)."""
    after = after or {}
    folder_of = {folder: name for name, folder in runs.items()}
    pending, running, wall, done = list(commands), {}, {}, set()

    def ready(name: str) -> bool:
        start = folder_of.get(after[name]) if name in after else None
        return start is None or start in done

    while pending or running:
        while len(running) < parallel and any(ready(n) for n in pending):
            name = next(n for n in pending if ready(n))
            pending.remove(name)
            log = (work / f"train_{name}.log").open("w")
            running[name] = (subprocess.Popen(commands[name], cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                              env=single_thread_env(parallel)), log, time.perf_counter())
        if not running and pending:
            raise RuntimeError(f"runs {pending} wait for runs that are not scheduled")
        for name, (proc, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                for other, _, _ in running.values():
                    other.kill()
                raise RuntimeError(f"ns-train ({name}) failed, see {work / f'train_{name}.log'}")
            wall[name] = time.perf_counter() - started
            done.add(name)
            command_record(runs[name]).write_text(run_record(commands[name], after.get(name)))
        time.sleep(1.0)
    return wall


def prepare_scenes(work: Path, cfg: AblationConfig) -> Dict[str, str]:
    """Generate each seed's scene unless ``work`` has it from the same command; a regenerated scene
    drops the command records of its runs, so they train again. Returns the scene commands by name."""
    commands: Dict[str, str] = {}
    for seed in cfg.seeds:
        cmd = scene_command(scene_dir(work, seed), cfg, seed)
        commands[f"scene_s{seed}"] = " ".join(cmd)
        record = scene_dir(work, seed) / "scene_command.txt"
        if not (record.is_file() and record.read_text() == command_text(cmd)):
            for name in [rgb_stage_name(seed), *(run_name(v, seed) for v in VARIANTS)]:  # made on the previous scene
                command_record(run_dir(work, name)).unlink(missing_ok=True)
            run_logged(cmd, work, work / f"scene_s{seed}.log")
            record.write_text(command_text(cmd))
    return commands


def run_ablation(work: Optional[Path] = None, cfg: Optional[AblationConfig] = None) -> Dict:
    """Generate the scenes, train the runs not trained yet, measure them all. JSON-ready result."""
    cfg = cfg or AblationConfig()
    ablation_config(**asdict(cfg))  # checks the fields
    work = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="trace3d-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()

    commands = prepare_scenes(work, cfg)
    # the RGB stages first (with two at a time, the last one trains beside the first variants instead
    # of alone), then the variants seed-major (a finished seed is a complete comparison)
    train, steps, after = {}, {}, {}
    for seed in cfg.seeds:
        rgb = rgb_stage_name(seed)
        train[rgb], steps[rgb] = rgb_stage_command(scene_dir(work, seed), work, cfg, seed), cfg.schedule.git_step
    for seed in cfg.seeds:
        scene, rgb = scene_dir(work, seed), rgb_stage_name(seed)
        for v in cfg.variants:
            name = run_name(v, seed)
            train[name] = train_command(scene, work, name, cfg, VARIANTS[v], seed, stage="after_rgb")
            steps[name], after[name] = cfg.steps, run_dir(work, rgb)
    commands.update({f"train_{k}": " ".join(v) for k, v in train.items()})
    retrain = {k for k in train if k not in after and not is_trained(run_dir(work, k), steps[k], train[k])}
    retrain |= {k for k, start in after.items()  # a variant whose RGB stage trains again trains again
                if start.name in retrain or not is_trained(run_dir(work, k), steps[k], train[k], start)}
    todo = {k: v for k, v in train.items() if k in retrain}
    train_wall = train_runs(todo, work, cfg.parallel, {k: run_dir(work, k) for k in todo},
                            {k: v for k, v in after.items() if k in todo})
    train_s = time.perf_counter() - start

    out: Dict = {"config": asdict(cfg), "schedule": asdict(cfg.schedule), "work_dir": str(work), "trained": sorted(todo),
                 "train_wall_s_per_run": train_wall, "commands": commands, "runs": {}}
    jobs = {(variant, seed): (run_dir(work, run_name(variant, seed)) / "config.yml", scene_dir(work, seed),
                              work / "pictures" / f"ablation_{variant}.png" if seed == cfg.seeds[0] else None,
                              cfg.picture_objects)
            for variant in cfg.variants for seed in cfg.seeds}
    measured = measure_runs(jobs, cfg.parallel)
    for variant in cfg.variants:
        out["runs"][variant] = {}
        for seed in cfg.seeds:
            record = {"variant": asdict(VARIANTS[variant]), "seed": seed, **measured[variant, seed]}
            cycles = run_dir(work, run_name(variant, seed)) / "density_control.json"
            if cycles.is_file():
                record["density_cycles"] = json.loads(cycles.read_text())
            out["runs"][variant][str(seed)] = record
    out["summary"] = summary(out["runs"])
    if "no_git" in out["runs"]:
        out["delta_vs_no_git"] = deltas(out["runs"], "no_git")
    out["pictures"] = {v: r[str(cfg.seeds[0])]["picture"] for v, r in out["runs"].items()}
    out["train_wall_s"] = train_s
    out["total_wall_s"] = time.perf_counter() - start
    return out


# ---- summary ------------------------------------------------------------------------------------
HEADLINE = ("object_iou_amodal", "object_biou", "novel_view_miou", "test_psnr")
"""The issue's four metrics (feature selection)."""

SUMMARY_FIELDS: Dict[str, Callable[[Dict], Optional[float]]] = {
    **{name: (lambda r, n=name: r["selection"]["feature"][n]) for name in HEADLINE},
    "object_iou_amodal_instance": lambda r: r["selection"]["instance"]["object_iou_amodal"],
    "object_biou_instance": lambda r: r["selection"]["instance"]["object_biou"],
    "novel_view_miou_instance": lambda r: r["selection"]["instance"]["novel_view_miou"],
    **{f"{name}_traced": (lambda r, n=name: r["selection"].get("traced", {}).get(n)) for name in HEADLINE[:3]},
    **{f"{name}_feature_instance": (lambda r, n=name: r["selection"].get("feature_instance", {}).get(n))
       for name in HEADLINE[:3]},
    "object_iou_amodal_oracle": lambda r: r.get("oracle", {}).get("object_iou_amodal"),
    "object_biou_oracle": lambda r: r.get("oracle", {}).get("object_biou"),
    "object_iou_modal": lambda r: r["selection"]["feature"]["object_iou"],
    "num_gaussians": lambda r: r["num_gaussians"],
    "ambiguous_fraction_consistent": lambda r: r["ambiguous_fraction_consistent"],
    "ambiguous_fraction_gt": lambda r: r["ambiguous_fraction_gt"],
}


def _stats(values: Dict[str, Optional[float]]) -> Dict:
    """mean, sample std (0 for one value) and the values by seed; None-valued seeds are left out of the statistics."""
    finite = [float(v) for v in values.values() if v is not None and math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else None
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else (0.0 if finite else None)
    return {"mean": mean, "std": std, "values": values}


def summary(runs: Dict[str, Dict[str, Dict]]) -> Dict[str, Dict[str, Dict]]:
    """variant -> metric -> {mean, std, values {seed: value}} (``runs``: variant -> seed -> run)."""
    return {variant: {key: _stats({seed: get(run) for seed, run in by_seed.items()}) for key, get in SUMMARY_FIELDS.items()}
            for variant, by_seed in runs.items()}


def deltas(runs: Dict[str, Dict[str, Dict]], baseline: str) -> Dict[str, Dict[str, Dict]]:
    """variant -> metric -> statistics of the per-seed difference to ``baseline`` (paired by seed)."""
    out = {}
    for variant, by_seed in runs.items():
        if variant == baseline:
            continue
        out[variant] = {}
        for key, get in SUMMARY_FIELDS.items():
            diff = {}
            for seed, run in by_seed.items():
                a, b = get(run), get(runs[baseline][seed]) if seed in runs[baseline] else None
                diff[seed] = None if a is None or b is None else a - b
            out[variant][key] = _stats(diff)
    return out


# ---- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, size_flag: bool = True, views_flag: bool = True) -> None:
    """The ablation's override flags (defaults: ``AblationConfig``, the benchmark's settings);
    ``size_flag`` / ``views_flag`` False where the caller defines ``--size`` / ``--views`` itself."""
    d = AblationConfig()
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {d.steps})")
    if size_flag:
        parser.add_argument("--size", type=int, default=None, help=f"image side in pixels (default {d.size})")
    parser.add_argument("--seeds", type=_int_list, default=None,
                        help=f"comma-separated seeds (default {','.join(map(str, d.seeds))})")
    if views_flag:
        parser.add_argument("--views", type=int, default=None, help=f"views per scene (default {d.views})")
    parser.add_argument("--objects", type=int, default=None, help=f"objects per scene (default {d.objects})")
    parser.add_argument("--variants", type=lambda t: [v for v in t.split(",") if v], default=None,
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--parallel", type=int, default=None, help=f"trainings at a time (default {d.parallel})")


def config_from_args(args: argparse.Namespace) -> AblationConfig:
    return ablation_config(steps=args.steps, size=args.size, seeds=args.seeds, views=args.views,
                           objects=args.objects, variants=args.variants, parallel=args.parallel)


def _int_list(text: str) -> List[int]:
    try:
        return [int(t) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.benchmarks.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary folder)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    result = run_ablation(args.work, cfg)
    write_result(result, args.out)
    print(json.dumps({v: {m: s[m]["mean"] for m in HEADLINE} for v, s in result["summary"].items()}, indent=2))
    return 0


def write_result(result: Dict, out: Path) -> None:
    """The JSON at ``out`` and the pictures beside it (``ablation_<variant>.png``, paths updated)."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    for variant, path in result.get("pictures", {}).items():
        target = out.parent / Path(path).name
        if Path(path).resolve() != target.resolve():
            shutil.copyfile(path, target)
        result["pictures"][variant] = str(target)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
