"""`trace3d-bench`: speed and memory goals, and segmentation measurements, as JSON (printed, and
written with --out; ``foreground`` also draws its picture: --out with the suffix .png, or
``foreground_<scene>.png`` here)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional


def _raster(args: argparse.Namespace) -> Dict:
    from trace3d_ns.benchmarks.raster import run_raster_benchmark

    return run_raster_benchmark(num_gaussians=args.gaussians or 20000, size=args.size or 128, repeats=args.repeats or 15)


def _scale(args: argparse.Namespace) -> Dict:
    from trace3d_ns.benchmarks.scale import run_scale_benchmark

    return run_scale_benchmark(
        num_gaussians=args.gaussians or 1_000_000, num_views=args.views or 200, size=args.size or 256, threads=args.threads,
        backend=args.backend,
    )


def _step(args: argparse.Namespace) -> Dict:
    from trace3d_ns.benchmarks.step import run_step_benchmark

    return run_step_benchmark(args.work)


def _masks(args: argparse.Namespace) -> Dict:
    from trace3d_ns.data.bench_masks import run_masks_benchmark

    return run_masks_benchmark(None)


def _export(args: argparse.Namespace) -> Dict:
    from trace3d_ns.benchmarks.export import run_export_benchmark

    return run_export_benchmark()


def _trace(args: argparse.Namespace) -> Dict:
    from trace3d_ns.benchmarks.trace import run_trace_benchmark

    return run_trace_benchmark(repeats=args.repeats or 3)


def _density(args: argparse.Namespace) -> Dict:
    from trace3d_ns.benchmarks.ablation import config_from_args
    from trace3d_ns.benchmarks.density import run_density_benchmark

    return run_density_benchmark(args.work, config_from_args(args))


def _ablation(args: argparse.Namespace) -> Dict:
    from trace3d_ns.benchmarks.ablation import config_from_args, run_ablation

    return run_ablation(args.work, config_from_args(args))


def _foreground(args: argparse.Namespace) -> Dict:
    from trace3d_ns.benchmarks.foreground import run_foreground_benchmark

    scene = args.scene or "dtu_scan37"
    picture = args.out.with_suffix(".png") if args.out is not None else Path(f"foreground_{scene}.png")
    return run_foreground_benchmark(scene, args.work, picture=picture)


def _objectness(args: argparse.Namespace) -> Dict:
    from trace3d_ns.benchmarks.objectness import run_objectness_benchmark, summary

    result = run_objectness_benchmark([args.scene] if args.scene else None)
    return {"summary": summary(result), **result}


BENCHMARKS: Dict[str, Callable[[argparse.Namespace], Dict]] = {
    "ablation": _ablation,
    "density": _density,
    "foreground": _foreground,
    "raster": _raster,
    "scale": _scale,
    "step": _step,
    "masks": _masks,
    "objectness": _objectness,
    "export": _export,
    "trace": _trace,
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="trace3d-bench", description=__doc__)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    parser.add_argument("--gaussians", type=int, default=None,
                        help="raster: number of Gaussians (default 20000); scale: (default 1000000)")
    parser.add_argument("--size", type=int, default=None, help="raster (default 128), scale (default 256), ablation / density (default 160): image side")
    parser.add_argument("--views", type=int, default=None, help="scale: number of views (default 200); ablation, density: views per scene (default 40)")
    parser.add_argument("--threads", type=int, default=None, help="scale: torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="raster: rounds of the backends timed in turn (median; default 15: this shared "
                             "machine's speed drifts by 20-40%% within minutes); trace: timed repeats (default 3)")
    parser.add_argument("--backend", choices=("auto", "compiled", "torch"), default="auto",
                        help="scale: rasterizer backend of the tracing (as the model's rasterizer field; auto: compiled on the CPU)")
    parser.add_argument("--work", type=Path, default=None,
                        help="ablation, density, foreground: working folder (finished trainings in it are reused); "
                        "step: where its scene and runs go (default: a temporary folder)")
    parser.add_argument("--scene", default=None,
                        help="foreground: dtu_scan37 (default) or lego; objectness: one of them (default: both)")
    from trace3d_ns.benchmarks.ablation import add_arguments

    add_arguments(
        parser.add_argument_group("ablation, density (defaults: the benchmark's settings)"), size_flag=False, views_flag=False
    )
    args = parser.parse_args(argv)
    if args.benchmark in ("ablation", "density"):
        from trace3d_ns.benchmarks.ablation import config_from_args

        try:
            config_from_args(args)
        except ValueError as err:
            parser.error(str(err))
    result = {"benchmark": args.benchmark, **BENCHMARKS[args.benchmark](args)}
    if args.out is not None and "pictures" in result:
        from trace3d_ns.benchmarks.ablation import write_result

        write_result(result, args.out)  # copies the pictures beside the JSON
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
