"""`trace3d-export`: segmented Gaussian-splat export of a trained trace3d checkpoint.

    trace3d-export --load-config CONFIG --output-dir DIR [--instances all|ID,ID,...]
                   [--min-gaussians N] [--bbox-percentiles LO HI]

Writes `scene.ply` (every exported Gaussian, ns-export layout plus an int32 `instance` property),
`instance_<id>.ply` per instance (exactly the ns-export layout) and `instances.json`; see
`trace3d_ns.export.segmented`. The pipeline is loaded like `ns-export` does
(`eval_setup(config, test_mode="inference")`, no images loaded).

Without instance labels in the model (tracing has not run yet):
- with `--instances all` (the default) only `scene.ply` is written, in the plain ns-export layout,
  with a warning on stderr, and the exit code is 0: a quick splat export still works;
- with explicit ids it is an error.

Exit codes: 0 success; 2 invalid invocation or input (bad arguments, config file not found, ids not
in the labels, explicit ids without labels, labels not matching the Gaussians), each reported as one
line on stderr without a traceback (argparse adds its usage line for bad arguments).
Failures inside nerfstudio's loading (e.g. no checkpoint) keep nerfstudio's own messages.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Union

PROG = "trace3d-export"


def parse_instances(text: str) -> Union[str, List[int]]:
    """`all` or a comma-separated list of integer ids."""
    if text.strip() == "all":
        return "all"
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or ids like 1,4,7, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a trained trace3d model as scene.ply, one PLY per instance and instances.json.",
        epilog="A model without instance labels: --instances all writes scene.ply only (with a warning); "
        "explicit ids are an error.",
    )
    parser.add_argument("--load-config", type=Path, required=True, metavar="CONFIG", help="the run's config.yml")
    parser.add_argument("--output-dir", type=Path, required=True, metavar="DIR", help="where the files are written")
    parser.add_argument(
        "--instances", type=parse_instances, default="all", metavar="all|ID,ID,...",
        help="'all' (every id > 0) or ids, e.g. 1,4,7 (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--min-gaussians", type=int, default=1, metavar="N",
        help="skip instances with fewer exported Gaussians (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--bbox-percentiles", type=float, nargs=2, metavar=("LO", "HI"), default=None,
        help="robust per-axis boxes from these percentiles, e.g. 1 99 (default: exact min/max)",
    )  # fmt: skip
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the export; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not args.load_config.is_file():
        return _fail(f"config file not found: {args.load_config}")
    if args.min_gaussians < 1:
        return _fail(f"--min-gaussians must be >= 1, got {args.min_gaussians}")
    if args.instances == []:
        return _fail("--instances lists no ids")

    import torch
    from nerfstudio.utils.eval_utils import eval_setup

    from trace3d_ns.export.ply import write_gaussian_ply
    from trace3d_ns.export.segmented import SCENE_FILE, export_segmented, instance_labels_from_model

    _, pipeline, checkpoint, _ = eval_setup(args.load_config, test_mode="inference")
    model = pipeline.model
    labels = instance_labels_from_model(model)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if labels is None:
            if args.instances != "all":
                return _fail(
                    "the model has no instance labels, so instances cannot be selected; "
                    "train longer or run the instance stage first"
                )
            print(
                f"{PROG}: warning: the model has no instance labels (train longer or run the instance stage); "
                f"writing the full scene only",
                file=sys.stderr,
            )
            kept = write_gaussian_ply(args.output_dir / SCENE_FILE, model)
            print(f"wrote {args.output_dir / SCENE_FILE}: {int(kept.sum())} of {kept.size} Gaussians from {checkpoint}")
            return 0
        try:
            bbox = None if args.bbox_percentiles is None else tuple(args.bbox_percentiles)
            index = export_segmented(model, labels, args.output_dir, args.instances, args.min_gaussians, bbox)
        except ValueError as err:
            return _fail(str(err))
    print(
        f"wrote {args.output_dir}: {len(index['instances'])} instances ({len(index['skipped'])} skipped), "
        f"{index['num_exported']} of {index['num_gaussians']} Gaussians in {SCENE_FILE}, from {checkpoint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
