"""GIT-guided density control, measured: the ablation's ``consistent_only`` (baseline) and ``full``
(density control) runs, which differ only in the density control cycles (up to the first cycle
they are the same computation).

    python -m trace3d_ns.benchmarks.density --out density.json [--work DIR]

Scene, schedule and measurements are those of :mod:`trace3d_ns.benchmarks.ablation` (Gaussian
counts, ambiguous fraction against the run's own consistent instances and against the ground truth,
object extraction by feature and by instance selection, test PSNR). Added here: the per-cycle
statistics of the density control run, and ``ns-export gaussian-splat`` on its checkpoint (whose
number of Gaussians changed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from trace3d_ns.benchmarks.ablation import BIN, AblationConfig, run_ablation, run_dir, run_logged

RUNS = {"baseline": "consistent_only", "density_control": "full"}
"""Name in this benchmark's summary -> ablation variant."""


def run_density_benchmark(work: Optional[Path] = None, cfg: Optional[AblationConfig] = None) -> Dict:
    """Train (unless finished in ``work``) and measure both runs; JSON-ready result."""
    cfg = cfg or AblationConfig()
    cfg.variants = list(RUNS.values())
    out = run_ablation(work, cfg)
    work = Path(out["work_dir"])
    export: List[str] = [str(BIN / "ns-export"), "gaussian-splat", "--load-config",
                         str(run_dir(work, RUNS["density_control"]) / "config.yml"), "--output-dir", str(work / "export")]
    out["commands"]["export"] = " ".join(export)
    try:
        run_logged(export, work, work / "export.log")
        out["ns_export_after_density_control_ok"] = True
    except RuntimeError:
        out["ns_export_after_density_control_ok"] = False
    out["summary"] = {key: {name: values[variant] for name, variant in RUNS.items()} for key, values in out["summary"].items()}
    out["summary"]["cycles"] = out["runs"][RUNS["density_control"]].get("density_cycles", [])
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.benchmarks.density", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    result = run_density_benchmark(args.work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
