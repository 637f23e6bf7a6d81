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

from trace3d_ns.benchmarks.ablation import HEADLINE, VARIANTS, run_ablation, write_result
from trace3d_ns.benchmarks.foreground import SCENES, run_foreground_benchmark
from trace3d_ns.benchmarks.objectness import objectness_table, run_objectness_benchmark

COMMAND = "bash scripts/benchmarks.sh"


def _num(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _check(flag: bool) -> str:
    return "yes" if flag else "-"


def _pm(stats: Dict, digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± std`` of a summary entry."""
    if stats["mean"] is None:
        return "-"
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


ABLATION_COLUMNS = [
    ("object IoU (amodal)", "object_iou_amodal", 3, 1.0),
    ("object boundary IoU", "object_biou", 3, 1.0),
    ("novel-view mIoU", "novel_view_miou", 3, 1.0),
    ("test PSNR", "test_psnr", 2, 1.0),
    ("amodal IoU, instance sel.", "object_iou_amodal_instance", 3, 1.0),
    ("boundary IoU, instance sel.", "object_biou_instance", 3, 1.0),
    ("amodal IoU, traced sel.", "object_iou_amodal_traced", 3, 1.0),
    ("amodal IoU, feature within instance", "object_iou_amodal_feature_instance", 3, 1.0),
    ("amodal IoU, GT-label oracle", "object_iou_amodal_oracle", 3, 1.0),
    ("Gaussians", "num_gaussians", 0, 1.0),
    ("ambiguous (GT) %", "ambiguous_fraction_gt", 2, 100.0),
]
"""(header, summary metric, digits, scale) of the ablation table."""


def ablation_table(result: Dict) -> List[str]:
    """Markdown rows: one per variant, each metric as mean ± std over the seeds."""
    rows = [
        "| variant | GIT | consistent maps | density control | " + " | ".join(h for h, *_ in ABLATION_COLUMNS) + " |",
        "|---|---|---|---|" + "---|" * len(ABLATION_COLUMNS),
    ]
    for name, variant in VARIANTS.items():
        stats = result["summary"].get(name)
        if stats is None:
            continue
        flags = f"{_check(variant.git)} | {_check(variant.consistent_labels)} | {_check(variant.density_control)}"
        cells = " | ".join(_pm(stats[key], digits, scale) for _, key, digits, scale in ABLATION_COLUMNS)
        rows.append(f"| `{name}` | {flags} | {cells} |")
    return rows


def ablation_seed_table(result: Dict) -> List[str]:
    """Markdown rows: the four headline metrics per variant and seed."""
    seeds = sorted({seed for stats in result["summary"].values() for seed in stats["object_iou_amodal"]["values"]}, key=int)
    rows = ["| variant | metric | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
    for name in VARIANTS:
        stats = result["summary"].get(name)
        if stats is None:
            continue
        for key in HEADLINE:
            values = stats[key]["values"]
            rows.append(f"| `{name}` | {key} | " + " | ".join(_num(values.get(s), 2 if key == "test_psnr" else 3) for s in seeds) + " |")
    return rows


def ablation_delta_table(result: Dict) -> List[str]:
    """Markdown rows: each variant's per-seed difference to ``no_git`` in the headline metrics (mean ± std)."""
    deltas = result.get("delta_vs_no_git", {})
    rows = ["| variant | " + " | ".join(f"Δ {key}" for key in HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
    for name in VARIANTS:
        if name in deltas:
            rows.append(f"| `{name}` | " + " | ".join(_pm(deltas[name][k], 2 if k == "test_psnr" else 3) for k in HEADLINE) + " |")
    return rows


def ablation_section(result: Dict, pictures: Dict[str, str]) -> List[str]:
    """The ablation's part of BENCHMARKS.md; ``pictures``: variant -> path of its picture relative to the report."""
    cfg, s = result["config"], result["schedule"]
    scene = next(iter(v for k, v in result["commands"].items() if k.startswith("scene_")))
    lines = [
        "## Ablation (the paper's Table 5) on cluttered generated scenes",
        "",
        f"Scenes: `{scene.split('/bin/')[-1]}` with `--seed` = each seed ({cfg['objects']} objects that touch, stack and",
        f"lean on each other, some sharing a texture across their contact, tables and lamps with thin parts; {cfg['size']} px;",
        f"{cfg['views']} views, every {cfg['test_every']}th held out; SAM-like masks: merged neighbours, parts, missed small",
        "objects, boundary jitter). Settings fixed in `trace3d_ns/benchmarks/ablation.py` before measuring, the same for",
        f"every variant. Seeds {', '.join(map(str, cfg['seeds']))}: seed s generates the scene and seeds the training.",
        "",
        f"Schedule ({s['steps']} steps, after the authors' release: RGB training, patch merging, density control inside",
        f"an RGB fine-tune, contrastive lifting): RGB from step 0 with splatfacto densification {s['warmup']}-{s['stop_split_at']};",
        f"GIT at {s['git_step']}; density control: {s['cycles']} cycles every {s['every']} steps from {s['git_step']}",
        f"(the last only prunes); feature lifting from {s['feature_start']} ({cfg['contrastive_samples']} contrastive",
        "pixels per step). `no_git` and `density_only` lift the features from the raw patches. Each seed's RGB stage",
        f"(steps 0-{s['git_step'] - 1}, `rgb_stage_s<seed>`) is trained once; every variant continues from its last",
        "checkpoint (`--load-checkpoint`), so the variants of a seed start GIT from the same Gaussians.",
        "",
        "Metrics (mean ± sample std over the seeds; selection by feature similarity unless marked otherwise:",
        "*instance*: the instance label voted at the prompt; *traced*: each training view's feature prediction traced",
        "back, Gaussians with > 0.66 of their weight inside (the authors' protocol); *feature within instance*:",
        "feature selection cut to the prompt's instance label, `--mode feature_instance`; the labels of every",
        "variant come from a Gaussian Instance Tracing run when it is measured):",
        "*object IoU (amodal)*: the selection rendered alone against the object ray cast alone (`gt_amodal/`), on",
        "every test view where the object is in frame, mean over views then objects; *object boundary IoU*: the same",
        "pairs' boundary IoU (Cheng et al. 2021: contour bands of width 2% of the image diagonal); *novel-view",
        "mIoU*: the selection's visible part against the visible GT; *test PSNR*: the full render;",
        "*ambiguous (GT)*: share of the Gaussians seen by a training view whose traced distribution over the",
        "ground-truth instances has max < 0.8 in more than half of their views; *GT-label oracle*: each object",
        "selected as the Gaussians whose traced ground-truth majority is that object, scored the same way: the",
        "best any labelling of these Gaussians can do (the gap to 1 is Gaussians that straddle objects or hide",
        "where training never saw them).",
        "",
        *ablation_table(result),
        "",
        "Difference to `no_git`, paired by seed (mean ± std of the per-seed differences):",
        "",
        *ablation_delta_table(result),
        "",
        "Per seed:",
        "",
        *ablation_seed_table(result),
        "",
    ]
    for name in VARIANTS:
        if name in pictures:
            lines += [f"`{name}` (seed {cfg['seeds'][0]}): ground truth against the extracted objects", "",
                      f"![{name}]({pictures[name]})", ""]
    lines += ["Commands:", "", "```", *[f"{k}: {v}" for k, v in result["commands"].items()], "```", ""]
    return lines


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
    "dtu_scan37": "DTU scan 37: 49 real 400x300 views, random initialisation, trained at 1/4, 1/2, then full resolution (from step 2000 of 3000); "
                  "GT = the objects on the bricks (`gt_masks/`)",
    "lego": "the Blender LEGO: 100 training views 200x200 RGBA (transparent background), random initialisation, "
            "trained at 1/2, then full resolution (from step 1000 of 2500); GT = alpha > 0.5 of the test images",
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


def render(ablation: Dict, foreground: Dict[str, Dict], wall_s: float, pictures: Optional[Dict[str, str]] = None) -> str:
    pictures = pictures or {}
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
        *ablation_section(ablation, pictures),
        *[line for result in foreground.values() for line in foreground_section(result)],
        "## Reading these numbers",
        "",
        "- The paper reports Replica (object extraction mIoU 72.1) and NVOS (mIoU 92.5, mAcc 98.6) with SAM masks,",
        "  GPU training to 30k steps and full resolution. These runs are CPU-sized (a few thousand steps, small",
        "  images, weights-free or synthetic masks): they compare the variants with each other, not with the paper.",
        "- The ablation runs several seeds (a new scene each; the variants of a seed are paired: `delta_vs_no_git` in",
        "  its JSON); the foreground benchmarks one. Runs whose label maps differ draw different contrastive samples,",
        "  so the torch random stream differs from the first difference on, even where the geometry would not.",
        "- The ablation's *amodal* IoU compares the selection alone with the object alone (nothing hidden); the",
        "  foreground protocol's *object IoU (alone)* charges a selection for the parts other objects hide in a",
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
    write_result(ablation, results / "ablation.json")  # and its pictures beside it
    pictures = {v: os.path.relpath(p, args.out.resolve().parent) for v, p in ablation["pictures"].items()}
    for scene, result in foreground.items():
        kept = {k: v for k, v in result.items() if k != "objectness"}  # in objectness.json
        (results / f"foreground_{scene}.json").write_text(json.dumps(kept, indent=2) + "\n")
    args.out.write_text(render(ablation, foreground, time.perf_counter() - start, pictures))
    print(f"wrote {args.out} (JSON in {results})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
