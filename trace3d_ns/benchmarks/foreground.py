"""Foreground segmentation on real scenes with NVOS's metrics: DTU scan 37 (``gt_masks/``, the
objects on the bricks) and the Blender LEGO (alpha), from ``../shared/data``.

    python -m trace3d_ns.benchmarks.foreground --scene dtu_scan37|lego --out FILE.json [--work DIR]
    trace3d-bench foreground --scene dtu_scan37|lego --out FILE.json [--work DIR]

One ``ns-train trace3d`` run per scene on the CPU with weights-free masks (``levels``: one
Felzenszwalb level drawn per view, so objects are whole in some views and split in others, as with
SAM, whose weights cannot be downloaded here), then ``trace3d_ns.evaluation.harness``'s steps on its
test views: ``points`` prompt points (3, NVOS-like clicks, and 16) spread over the GT foreground of
one training view (the deepest pixel first, then greedily the pixel farthest from the chosen ones
and from the mask's boundary), the union of their selections, its visible silhouette scored per
test view (mIoU, mAcc), by feature similarity, by instance label and by feature cluster. The result
keeps each run under ``points_<n>.<mode>``; a picture (``FILE.png`` beside ``--out``) shows, per
selection mode with 3 points, the prediction, the ground truth, and the misses and false hits on the
test view of median IoU. The data folder is only read: the mask cache goes to ``--work``. A
finished run in ``--work`` with the same training command is measured again without training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from trace3d_ns.benchmarks.ablation import cpu_train_command, is_trained, train_runs

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MODES = ("feature", "instance", "feature_instance", "feature_clusters")
"""Selection modes measured: feature similarity, GIT's instance labels, feature similarity within the
clicked instance label (what `auto` selects on a model with both), labels from clustering the features
(last: it replaces GIT's labels)."""


@dataclass
class ForegroundConfig:
    """One scene's run (sized for CPU training)."""

    experiment: str = "dtu"
    """ns-train's experiment name (the run folder is ``<work>/outputs/<experiment>/trace3d/run``)."""
    steps: int = 2000
    num_downscales: int = 2
    """splatfacto's coarse-to-fine schedule: 1/2**num_downscales resolution first, halving the
    downscale every ``resolution_schedule`` steps (DTU: 100x75, 200x150 from 1000, full 400x300 from 2000)."""
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
    points: List[int] = field(default_factory=lambda: [3, 16])
    """Prompt point counts, one measurement each (the union of a run's selections is scored): 3 is
    a user's few clicks; 16 is kept from the part-level masks of the ``superpixel`` source, whose
    instances were object parts, so that few points selected only the parts under them."""
    mask_source: str = "levels"
    """The weights-free mask source (``levels``: whole objects in some views; ``superpixel``: parts)."""
    mask_flags: List[str] = field(default_factory=list)
    """Extra mask-source flags."""
    dataparser: List[str] = field(default_factory=list)
    """Dataparser subcommand and its flags, appended to ``ns-train``."""
    needs: List[str] = field(default_factory=list)
    """Files or folders the scene folder must hold."""


SCENES: Dict[str, ForegroundConfig] = {
    # 49 views 400x300: 1/4, 1/2, then full resolution from step 2000; poses as given (see random_scale)
    "dtu_scan37": ForegroundConfig(
        steps=3000, stop_split_at=2000,
        dataparser=["nerfstudio-data", "--center-method", "none", "--auto-scale-poses", "False", "--orientation-method", "none"],
        needs=["transforms.json", "gt_masks"],
    ),
    # 100 train views 200x200 RGBA: 1/2 resolution, full from step 1000. The RGBA images are kept (no
    # --alpha-color): splatfacto composites them on its random background, so empty space stays empty
    # (composited on white, all Gaussians together covered the object with IoU 0.32).
    "lego": ForegroundConfig(
        experiment="lego", steps=2500, num_downscales=1, resolution_schedule=1000, git_step=600, stop_split_at=1500,
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
        "--pipeline.datamanager.mask-source", cfg.mask_source, *cfg.mask_flags,
        "--pipeline.datamanager.cache-dir", str(work / "cache"),
        "--pipeline.density.cycles", "0",
        *cfg.dataparser,
    ]


def points_key(points: int) -> str:
    """Where a run with this many prompt points is kept in the result."""
    return f"points_{points}"


@torch.no_grad()
def prefix_selections(model, camera, prompts: Sequence, counts: Sequence[int], settings) -> Dict[int, Dict]:
    """The union of the selections of the first ``n`` prompts, for each ``n`` in ``counts``; each
    prompt is selected once (``harness.prompt_points`` is greedy, so the first 3 of 16 points are the
    3 points). Returns n -> {"mask": [N] bool, "prompts": the first n, "notes": why a prompt selected nothing}."""
    from trace3d_ns.selection import select_from_point

    union = torch.zeros(model.num_points, dtype=torch.bool, device=model.device)
    notes: List[str] = []
    out: Dict[int, Dict] = {}
    for i in range(max(counts, default=0) + 1):
        if i in counts:
            out[i] = {"mask": union.clone(), "prompts": list(prompts[:i]), "notes": list(notes)}
        if i == len(prompts) or i == max(counts):
            break
        try:
            union |= select_from_point(model, camera, (prompts[i].x, prompts[i].y), settings.mode, settings.threshold)
        except ValueError as err:  # e.g. nothing is rendered at the prompt pixel
            notes.append(str(err))
    for n in counts:  # fewer prompts than asked for (a small mask): all of them
        out.setdefault(n, {"mask": union.clone(), "prompts": list(prompts), "notes": list(notes)})
    return out


@torch.no_grad()
def measure(config_path: Path, data: Path, points: Sequence[int], picture: Optional[Path] = None) -> Dict:
    """Foreground mIoU / mAcc per prompt-point count and selection mode, and the run's size; with
    ``picture``, the 3-point (else the fewest-point) selections drawn on the test view of median IoU."""
    from nerfstudio.utils.eval_utils import eval_setup
    from trace3d_ns.evaluation.ground_truth import find_ground_truth, pipeline_views
    from trace3d_ns.evaluation.harness import (
        Settings, foreground_scores, prompt_points, reference_view, resolve_mode, visible_silhouette,
    )
    from trace3d_ns.selection import camera_contributions

    _, pipeline, _, step = eval_setup(config_path, test_mode="test")
    model = pipeline.model
    model.eval()
    gt = find_ground_truth(data)
    train, test, missing = pipeline_views(pipeline, gt)
    masks = [v.gt > 0 for v in train]
    ref = reference_view(masks)
    prompts = [] if ref is None else prompt_points(masks[ref], max(points))
    out: Dict = {"step": step, "num_gaussians": model.num_points, "test_views": [v.name for v in test],
                 "reference_view": None if ref is None else train[ref].name}
    drawn = min(points, key=lambda n: (n != 3, n))
    selections: Dict[str, torch.Tensor] = {}
    chosen_by: Dict[tuple, Dict] = {}  # (mode, points) -> selection
    for mode in MODES:
        if mode == "feature_clusters":
            pipeline.label_from_features()  # replaces GIT's labels: the last mode
        settings = replace(Settings(), mode=resolve_mode(model, "instance" if mode == "feature_clusters" else mode))
        if ref is None:
            nothing = torch.zeros(model.num_points, dtype=torch.bool, device=model.device)
            chosen = {n: {"mask": nothing, "prompts": [], "notes": ["no training view shows the foreground"]} for n in points}
        else:
            chosen = prefix_selections(model, train[ref].camera, prompts, points, settings)
        for n in points:
            chosen_by[(mode, n)] = chosen[n]
        selections[mode] = chosen[drawn]["mask"]
    # every selection scored on each test view in turn: one view's pairs at a time
    preds: Dict[tuple, list] = {key: [] for key in chosen_by}
    for view in test:
        scene = camera_contributions(model, view.camera)
        for key, sel in chosen_by.items():
            preds[key].append(visible_silhouette(scene, sel["mask"]))
        del scene
    for (mode, n), sel in chosen_by.items():
        fg = foreground_scores(preds[(mode, n)], test)
        out.setdefault(points_key(n), {})[mode] = {
            "miou": fg["miou"], "macc": fg["macc"], "num_selected": int(sel["mask"].sum()),
            "prompts": [{"x": p.x, "y": p.y, "clearance_px": round(p.clearance, 2)} for p in sel["prompts"]],
            "notes": sel["notes"], "per_view": fg["per_view"],
        }
    if picture is not None and test:
        per_view = out[points_key(drawn)][MODES[0]]["per_view"]
        order = sorted(range(len(test)), key=lambda i: (per_view[test[i].name]["iou"], i))
        index = order[len(order) // 2]
        view = test[index]
        drawn_preds = {mode: preds[(mode, drawn)][index] for mode in selections}
        save_foreground_picture(picture, view.image, view.gt > 0, drawn_preds, f"{drawn} points, test view {view.name}")
        out["picture"] = {"file": picture.name, "view": view.name, "points": drawn}
    return out


COLOURS = {"hit": (255, 255, 255), "miss": (230, 40, 40), "false": (40, 110, 255), "empty": (0, 0, 0)}
"""Error map colours: hit = selected and foreground, miss = foreground not selected, false = selected
background, empty = neither."""


def error_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8: ``COLOURS`` of each pixel's outcome (pred and gt [H, W] bool)."""
    out = np.zeros((*gt.shape, 3), dtype=np.uint8)
    out[pred & gt] = COLOURS["hit"]
    out[~pred & gt] = COLOURS["miss"]
    out[pred & ~gt] = COLOURS["false"]
    return out


def save_foreground_picture(
    path: Path, image: Optional[torch.Tensor], gt: np.ndarray, preds: Dict[str, np.ndarray], title: str
) -> None:
    """One row per selection mode: test image, prediction, ground truth, error map (white hits,
    red misses, blue false hits), with a caption line above each row."""
    from PIL import Image, ImageDraw

    H, W = gt.shape
    rgb = (np.zeros((H, W, 3), np.uint8) if image is None
           else (image.detach().cpu().numpy().clip(0, 1) * 255).round().astype(np.uint8))  # [H, W, 3]
    white = lambda m: np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=2)  # noqa: E731
    caption, gap = 14, 4
    canvas = Image.new("RGB", (4 * W + 3 * gap, caption + len(preds) * (H + caption)), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), f"{title} | image, prediction, ground truth, errors (white hit, red miss, blue false hit)",
              fill=(255, 255, 255))
    for row, (mode, pred) in enumerate(preds.items()):
        top = caption + row * (H + caption)
        tp, fp, fn = int((pred & gt).sum()), int((pred & ~gt).sum()), int((~pred & gt).sum())
        iou = tp / max(tp + fp + fn, 1)
        draw.text((2, top + 1), f"{mode}: IoU {iou:.3f}, {fn} missed, {fp} false", fill=(255, 255, 255))
        for col, tile in enumerate((rgb, white(pred), white(gt), error_map(pred, gt))):
            canvas.paste(Image.fromarray(tile), (col * (W + gap), top + caption))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def run_foreground_benchmark(
    scene: str,
    work: Optional[Path] = None,
    data: Optional[Path] = None,
    cfg: Optional[ForegroundConfig] = None,
    picture: Optional[Path] = None,
) -> Dict:
    """Train (unless finished in ``work``) and measure one of ``SCENES`` (any scene folder when
    ``cfg`` is given); JSON-ready result. ``picture``: where to draw the selections (PNG)."""
    if cfg is None and scene not in SCENES:
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
        **measure(run / "config.yml", data, cfg.points, picture),
        "train_wall_s": train_s, "total_wall_s": time.perf_counter() - start,
    }


def summary(result: Dict) -> Dict:
    """``points_<n>.<mode>`` -> mIoU, mAcc and the number of Gaussians selected."""
    return {
        points_key(n): {m: {k: r[k] for k in ("miou", "macc", "num_selected")} for m, r in result[points_key(n)].items()}
        for n in result["config"]["points"]
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.benchmarks.foreground", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scene", choices=sorted(SCENES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result (the picture goes beside it, .png)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: ./<scene>_benchmark)")
    parser.add_argument("--data", type=Path, default=None, help="the scene folder (default: ../shared/data/<scene>)")
    args = parser.parse_args(argv)
    result = run_foreground_benchmark(args.scene, args.work, args.data, picture=args.out.with_suffix(".png"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
