"""GIT-guided density control, measured: the ablation's ``consistent_only`` (baseline) and ``full``
(density control) runs, which differ only in the density control cycles (up to the first cycle
they are the same computation).

    python -m trace3d_ns.benchmarks.density --out density.json [--work DIR] [--steps N] [--size S] [--seeds 0,1,2]

Scenes, seeds, schedule and measurements are those of :mod:`trace3d_ns.benchmarks.ablation` (Gaussian
counts, ambiguous fraction against the run's own consistent instances and against the ground truth,
3D extraction by feature and by instance selection, test PSNR). Added here: the per-cycle
statistics of the density control runs, and ``ns-export gaussian-splat`` on the first seed's
checkpoint (whose number of Gaussians changed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from trace3d_ns.benchmarks.ablation import (
    BIN,
    AblationConfig,
    add_arguments,
    config_from_args,
    run_ablation,
    run_dir,
    run_logged,
    run_name,
    write_result,
)

RUNS = {"baseline": "consistent_only", "density_control": "full"}
"""Name in this benchmark's summary -> ablation variant."""


def run_density_benchmark(work: Optional[Path] = None, cfg: Optional[AblationConfig] = None) -> Dict:
    """Train (unless finished in ``work``) and measure both runs; JSON-ready result."""
    cfg = cfg or AblationConfig()
    cfg.variants = list(RUNS.values())
    out = run_ablation(work, cfg)
    work = Path(out["work_dir"])
    first = run_name(RUNS["density_control"], cfg.seeds[0])
    export: List[str] = [str(BIN / "ns-export"), "gaussian-splat", "--load-config",
                         str(run_dir(work, first) / "config.yml"), "--output-dir", str(work / "export")]
    out["commands"]["export"] = " ".join(export)
    try:
        run_logged(export, work, work / "export.log")
        out["ns_export_after_density_control_ok"] = True
    except RuntimeError:
        out["ns_export_after_density_control_ok"] = False
    out["summary"] = {name: out["summary"][variant] for name, variant in RUNS.items()}
    out["cycles"] = {seed: run.get("density_cycles", []) for seed, run in out["runs"][RUNS["density_control"]].items()}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.benchmarks.density", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary folder)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    result = run_density_benchmark(args.work, cfg)
    write_result(result, args.out)
    print(json.dumps({name: {k: v["mean"] for k, v in s.items()} for name, s in result["summary"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
