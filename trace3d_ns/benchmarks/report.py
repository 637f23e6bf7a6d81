"""BENCHMARKS.md from the ablation and foreground (DTU scan 37, LEGO) benchmarks: run them (or reuse their finished runs in
``--work``), keep their JSON beside the report, and write the tables.

    python -m trace3d_ns.benchmarks.report --out BENCHMARKS.md [--work DIR]

(``bash scripts/benchmarks.sh`` sets up the environment and runs this.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from trace3d_ns.benchmarks.ablation import VARIANTS, run_ablation
from trace3d_ns.benchmarks.foreground import SCENES, run_foreground_benchmark
from trace3d_ns.benchmarks.objectness import objectness_table, run_objectness_benchmark

COMMAND = "bash scripts/benchmarks.sh"


def _num(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _check(flag: bool) -> str:
    return "yes" if flag else "-"


def ablation_table(result: Dict, mode: str) -> List[str]:
    """Markdown rows: one per variant, selection by ``mode``."""
    rows = [
        "| variant | GIT | consistent maps | density control | object IoU (alone) | object IoU (visible) | "
        "novel-view mIoU | object PSNR | fg mIoU | fg mAcc | test PSNR | Gaussians | ambiguous (GT) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        run = result["runs"].get(name)
        if run is None:
            continue
        v, sel = run["variant"], run["selection"][mode]
        rows.append(
            f"| `{name}` | {_check(v['git'])} | {_check(v['consistent_labels'])} | {_check(v['density_control'])} | "
            f"{_num(sel['mean_iou'])} | {_num(sel['mean_iou_visible'])} | {_num(sel['novel_view_miou'])} | "
            f"{_num(sel['mean_psnr'], 2)} | {_num(sel['foreground_miou'])} | {_num(sel['foreground_macc'])} | "
            f"{_num(run['test_psnr'], 2)} | {run['num_gaussians']} | {100 * run['ambiguous_fraction_gt']:.2f}% |"
        )
    return rows


def foreground_table(result: Dict) -> List[str]:
    """Markdown rows: one per selection mode, mIoU / mAcc for each prompt-point count."""
    counts = result["config"]["points"]
    modes = list(result[f"points_{counts[0]}"])
    head = "| selection | " + " | ".join(f"{n} points mIoU | {n} points mAcc" for n in counts)
    rows = [head + f" | Gaussians selected ({counts[0]} points) |", "|---|" + "---|---|" * len(counts) + "---|"]
    for mode in modes:
        runs = [result[f"points_{n}"][mode] for n in counts]
        rows.append(f"| {mode} | " + " | ".join(f"{_num(r['miou'])} | {_num(r['macc'])}" for r in runs)
                    + f" | {runs[0]['num_selected']} / {result['num_gaussians']} |")
    return rows


SCENE_TEXT = {
    "dtu_scan37": "DTU scan 37: 49 real 400x300 views, random initialisation, trained at 1/4 then 1/2 resolution; "
                  "GT = the objects on the bricks (`gt_masks/`)",
    "lego": "the Blender LEGO: 100 training views 200x200 RGBA (transparent background), random initialisation, "
            "trained at 1/2 resolution; GT = alpha > 0.5 of the test images",
}


def foreground_section(result: Dict) -> List[str]:
    cfg = result["config"]
    picture = result.get("picture", {})
    return [
        f"## Foreground segmentation on {result['scene']} (NVOS metrics)",
        "",
        f"{SCENE_TEXT.get(result['scene'], result['scene'])}. Weights-free `{cfg.get('mask_source', 'superpixel')}` masks "
        f"(SAM weights cannot be downloaded here), {cfg['steps']} steps, GIT and feature lifting from step {cfg['git_step']}.",
        f"Prompts: {' and '.join(str(n) for n in cfg['points'])} points spread over the GT foreground of the training view "
        f"`{result.get('reference_view')}` (the deepest pixel first, then the pixels farthest from the chosen ones and the "
        "mask's boundary); the union of their selections is scored on the test views "
        + ", ".join(f"`{v}`" for v in result["test_views"][:8]) + (" ..." if len(result["test_views"]) > 8 else "") + ".",
        "",
        *foreground_table(result),
        "",
        *(["Without training, per view against the GT foreground (`trace3d-bench objectness`; means over "
           f"{len(result['objectness']['views'])} views; *object in one patch*: IoU >= 0.9; *cohesion* / *leakage*: how "
           "often two object pixels / an object and a background pixel share a patch, the views' vote for joining them):",
           "", *objectness_table(result["objectness"]), ""] if "objectness" in result else []),
        *([f"![{result['scene']}: {picture['points']} points, test view {picture['view']}]({picture['markdown_path']})",
           "",
           f"Test view `{picture['view']}` (median IoU), {picture['points']} points; per selection mode: image, prediction, "
           "ground truth, errors (white: hit, red: missed foreground, blue: false hit).", ""]
          if "markdown_path" in picture else []),
        "```",
        f"train: {result['commands']['train']}",
        "```",
        "",
    ]


def render(ablation: Dict, foreground: Dict[str, Dict], wall_s: float) -> str:
    cfg = ablation["config"]
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{COMMAND}` (`python -m trace3d_ns.benchmarks.report`), which trains every run below on the CPU",
        "and measures it; the raw numbers are in `docs/benchmarks/*.json`.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s) per run, no GPU; "
        f"torch {torch.__version__}. Wall time of this report: {wall_s / 60:.0f} min.",
        "",
        "Protocol (`trace3d_ns/evaluation/harness.py`): per ground-truth object, one point prompt at the deepest",
        "pixel of its mask on the training view where it is largest; the Gaussians selected from it (by feature",
        "similarity, or by instance label) are scored on the held-out test views. *Object IoU (alone)*: the",
        "selection rendered without the rest of the scene against the object's visible GT mask (3D extraction;",
        "occluded views cost IoU); *object IoU (visible)* and *novel-view mIoU*: the selection's share of the full",
        "render > 0.5 (occluders hide it as in the image); *object PSNR*: the selection alone over black against",
        "the masked test image inside the padded box; *fg*: NVOS foreground mIoU / mAcc of the union of the",
        "selections; *ambiguous (GT)*: the share of the Gaussians seen by a training view whose traced",
        "distribution over the ground-truth instances has max < 0.8 in more than half of their views.",
        "",
        "## Ablation (the paper's Table 5) on a generated scene with SAM-like masks",
        "",
        f"Scene: `{ablation['commands']['scene'].split('/bin/')[-1]}` ({cfg['views']} views, every 8th held out, "
        f"{cfg['size']} px, {cfg['objects']} objects; masks that disagree across views like SAM's: merged neighbours,",
        "parts, boundary jitter, missed small objects). Each run: "
        f"{cfg['steps']} steps, RGB from step 0, splatfacto densification {cfg['warmup']}-{cfg['stop_split_at']}, "
        f"GIT and feature lifting from step {cfg['git_step']} ({cfg['contrastive_samples']} contrastive pixels per step),",
        f"density control: {cfg['cycles']} cycles from step {cfg['stop_split_at']} every {cfg['every']} steps. "
        "`no_git` and `density_only` lift the features from the raw patches.",
        "",
        "Selection by **feature similarity** (the clicked pixel's rendered 16-D feature against the Gaussians'",
        "back-projected features, cosine similarity >= 0.7):",
        "",
        *ablation_table(ablation, "feature"),
        "",
        "Selection by **instance label** (every run re-traced on its final model, so `no_git` here means GIT",
        "applied once after training, without its training-time effects):",
        "",
        *ablation_table(ablation, "instance"),
        "",
        "Selection by **feature cluster** (`trace3d-trace --from features`: HDBSCAN on the lifted features, every",
        "Gaussian joins its nearest cluster; the click selects the cluster voted at the prompt pixel):",
        "",
        *ablation_table(ablation, "feature_clusters"),
        "",
        "Commands:",
        "",
        "```",
        *[f"{k}: {v}" for k, v in ablation["commands"].items()],
        "```",
        "",
        *[line for result in foreground.values() for line in foreground_section(result)],
        "## Reading these numbers",
        "",
        "- The paper reports Replica (object extraction mIoU 72.1) and NVOS (mIoU 92.5, mAcc 98.6) with SAM masks,",
        "  GPU training to 30k steps and full resolution. These runs are CPU-sized (a few thousand steps, small",
        "  images, weights-free or synthetic masks): they compare the variants with each other, not with the paper.",
        "- One seed per variant. The feature loss never moves the geometry, but runs whose label maps differ draw",
        "  different contrastive samples, so the torch random stream (and splatfacto's densification after it)",
        "  differs: test PSNR differences of a few tenths of a dB between variants are of that order.",
        "- *Object IoU (alone)* charges a selection for the parts of its object that other objects hide in a",
        "  test view; *visible* IoU is the 2D segmentation score.",
        "- The foreground scenes use weights-free masks instead of SAM. A pixel's patch is the intersection of the",
        "  masks covering it, so a source that splits an object into the same parts in every view (`superpixel`)",
        "  gives part-level instances, and a point selects the part under it. The `levels` source draws one",
        "  Felzenszwalb level per view, so objects are whole in some views (`trace3d-bench objectness` measures",
        "  it per view) and GIT can join their parts; 3 points are a user's few clicks, 16 NVOS-like scribbles.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="the Markdown report")
    parser.add_argument("--work", type=Path, default=Path("benchmark_runs"),
                        help="working folder: scenes, runs and logs (finished runs are reused)")
    parser.add_argument("--json-dir", type=Path, default=Path("docs/benchmarks"), help="where the JSON results go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    work = args.work.resolve()
    ablation = run_ablation(work / "ablation")
    results = args.json_dir
    results.mkdir(parents=True, exist_ok=True)
    foreground = {
        scene: run_foreground_benchmark(scene, work / scene, picture=results / f"foreground_{scene}.png") for scene in SCENES
    }
    objectness = run_objectness_benchmark(list(SCENES))
    (results / "objectness.json").write_text(json.dumps(objectness, indent=2) + "\n")
    for scene, result in foreground.items():
        if "picture" in result:
            result["picture"]["markdown_path"] = os.path.relpath(results / result["picture"]["file"], args.out.parent)
        result["objectness"] = objectness["scenes"][scene]
    (results / "ablation.json").write_text(json.dumps(ablation, indent=2) + "\n")
    for scene, result in foreground.items():
        kept = {k: v for k, v in result.items() if k != "objectness"}  # in objectness.json
        (results / f"foreground_{scene}.json").write_text(json.dumps(kept, indent=2) + "\n")
    args.out.write_text(render(ablation, foreground, time.perf_counter() - start))
    print(f"wrote {args.out} (JSON in {results})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
