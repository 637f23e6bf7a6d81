"""`trace3d-trace`: run Gaussian Instance Tracing on a trained trace3d model, on demand.

Loads the run (its masks come from the mask cache), traces every training view, builds the
consistent instance maps (stored in the mask cache) and writes the per-Gaussian instance labels
into the run's latest checkpoint, so `ns-viewer`, `trace3d-export` and `trace3d-eval` use them.
With `--from features` the labels come from clustering the lifted features instead
(`trace3d_ns.features.clustering`: HDBSCAN, then nearest cluster by cosine similarity).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="trace3d-trace", description=__doc__)
    parser.add_argument("--load-config", type=Path, required=True, help="config.yml of a trace3d run")
    parser.add_argument("--from", dest="source", choices=("git", "features"), default="git",
                        help="labels from Gaussian Instance Tracing (default) or from clustering the lifted features")
    parser.add_argument("--dry-run", action="store_true", help="report the instances, do not write the checkpoint")
    args = parser.parse_args(argv)
    if not args.load_config.is_file():
        print(f"trace3d-trace: error: config file not found: {args.load_config}", file=sys.stderr)
        return 2

    import torch

    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, ckpt_path, step = eval_setup(args.load_config, test_mode="val")
    if not hasattr(pipeline, "run_instance_tracing"):
        print("trace3d-trace: error: this run was not trained with the trace3d method", file=sys.stderr)
        return 2
    if args.source == "features":
        if not pipeline.model.has_features:
            print("trace3d-trace: error: --from features needs a model with a feature field", file=sys.stderr)
            return 2
        num_instances = int(pipeline.label_from_features().max())
    else:
        num_instances = pipeline.run_instance_tracing(step=step).stats.num_instances
    if args.dry_run:
        return 0
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    for name in ("instance_labels", "instance_confidence"):
        checkpoint["pipeline"][f"_model.{name}"] = getattr(pipeline.model, name).cpu()
    tmp = ckpt_path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, ckpt_path)
    print(f"wrote {num_instances} instances for {pipeline.model.num_points} Gaussians into {ckpt_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
