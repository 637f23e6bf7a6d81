"""trace3d-eval: score a trained trace3d model's point-prompted selections against ground truth.

Usage::

    trace3d-eval --load-config outputs/.../config.yml --gt /path/to/scene --out metrics.json \\
        [--reference-view I] [--mode auto|feature|instance] [--threshold T] \\
        [--kind auto|instances|foreground|alpha] [--points K]

It loads the pipeline with nerfstudio's ``eval_setup(config, test_mode="test")``, matches the ground
truth to the training and test images (``trace3d_ns.evaluation.ground_truth``), runs the protocol
of ``trace3d_ns.evaluation.harness`` on the test views, writes the JSON (its ``metrics`` holds the
headline numbers: ``object_iou_amodal``, ``object_biou``, ``novel_view_miou``, ``test_psnr``; the
first two need ``gt_amodal/`` beside ``gt_instances/``) and prints a summary. User
errors (missing files, unmatched ground truth, a mode the checkpoint cannot do) exit with code 2
and a single line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from trace3d_ns.evaluation.ground_truth import GroundTruthError, find_ground_truth, pipeline_views
from trace3d_ns.evaluation.harness import EvaluationError, Settings, evaluate
from trace3d_ns.selection import FEATURE_THRESHOLD

PROG = "trace3d-eval"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(message)


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--load-config", type=Path, required=True, metavar="CONFIG", help="config.yml written by ns-train")
    p.add_argument("--gt", type=Path, required=True, metavar="DIR",
                   help="scene folder with gt_instances/ or gt_masks/, the mask folder itself, or a Blender scene")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.json", help="where to write the metrics")
    p.add_argument("--reference-view", type=int, default=None, metavar="I",
                   help="training-view index (datamanager order) for every prompt; default: per mask, the "
                        "training view where it has the largest inscribed disc")
    p.add_argument("--mode", choices=("auto", "feature", "instance", "traced", "feature_instance"), default="auto",
                   help="selection by feature similarity, instance label, feature predictions traced back "
                        "over the training views, or feature similarity within the clicked instance label "
                        "(auto: feature_instance with features and labels, feature with features only, else instance)")
    p.add_argument("--threshold", type=float, default=FEATURE_THRESHOLD, metavar="T",
                   help="feature selection: cosine-similarity threshold")
    p.add_argument("--kind", choices=("auto", "instances", "foreground", "alpha"), default="auto",
                   help="ground-truth kind (auto: detected from the folder)")
    p.add_argument("--points", type=int, default=3, metavar="K",
                   help="prompt points for foreground-only ground truth (union of their selections)")
    return p


def _load_pipeline(config_path: Path):
    """The trained pipeline (test split), via nerfstudio's eval_setup."""
    from nerfstudio.utils.eval_utils import eval_setup

    def check_checkpoint(config):
        ckpt_dir = config.get_checkpoint_dir()
        if not ckpt_dir.is_dir() or not any(ckpt_dir.glob("step-*.ckpt")):
            raise EvaluationError(
                f"no checkpoint (step-*.ckpt) in {ckpt_dir} (relative paths resolve from the current directory)"
            )
        return config

    _, pipeline, _, _ = eval_setup(config_path, test_mode="test", update_config_callback=check_checkpoint)
    return pipeline


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary(result: Dict) -> str:
    """A plain-text table of the headline numbers."""
    lines: List[str] = [f"trace3d-eval  mode={result['mode']}  threshold={result['threshold']}  "
                        f"gaussians={result['num_gaussians']}  test views={len(result['test_views'])}"]
    if "objects" in result:
        lines.append(f"{'object':>6}  {'reference view':<28} {'selected':>8}  {'IoU':>6}  {'vis.IoU':>7}  {'PSNR':>6}  views")
        for oid, o in result["objects"].items():
            ref = o["reference_view"] or "-"
            scores = f"{_fmt(o['iou']):>6}  {_fmt(o['iou_visible']):>7}  {_fmt(o['psnr'], 2):>6}"
            lines.append(f"{oid:>6}  {ref:<28} {o['num_selected']:>8}  {scores}  {len(o['views'])}")
        ext = result["object_extraction"]
        lines.append(f"object extraction (a): mean IoU {_fmt(ext['mean_iou'])} alone, {_fmt(ext['mean_iou_visible'])} visible, "
                     f"mean PSNR {_fmt(ext['mean_psnr'], 2)} dB over {ext['num_objects']} objects")
        if ext["num_objects_amodal"]:
            lines.append(f"3D extraction (amodal GT): mean IoU {_fmt(ext['mean_iou_amodal'])}, boundary IoU "
                         f"{_fmt(ext['mean_biou'])} over {ext['num_objects_amodal']} objects")
        lines.append(f"novel-view segmentation (b): mIoU {_fmt(result['novel_view_segmentation']['miou'])}")
    fg = result["foreground"]
    lines.append(f"foreground (c, NVOS): mIoU {_fmt(fg['miou'])}, mAcc {_fmt(fg['macc'])}")
    lines.append(f"test PSNR: {_fmt(result['test_psnr']['mean'], 2)} dB")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.load_config.is_file():
        _fail(f"config file {args.load_config} does not exist")
    if args.points < 1:
        _fail("--points must be at least 1")
    try:
        gt = find_ground_truth(args.gt, args.kind)
        pipeline = _load_pipeline(args.load_config)
        train, test, missing = pipeline_views(pipeline, gt)
        settings = Settings(args.mode, args.threshold, args.reference_view, args.points)
        result = evaluate(pipeline.model, train, test, gt.has_objects, settings)
    except (GroundTruthError, EvaluationError) as err:
        _fail(str(err))
    result = {"config": str(args.load_config), "ground_truth": {"kind": gt.kind, "folder": str(gt.folder)},
              "test_views_without_gt": missing, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if missing:
        print(f"warning: {len(missing)} test images have no ground truth and were skipped: {', '.join(missing)}")
    print(summary(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
