"""`python -m trace3d_ns.gpu_check [--device cuda|cpu] [--steps N] [--work DIR]` (what
`scripts/gpu_check.sh` runs): everything a user does, on one machine, as one JSON object.

Stages (see ``trace3d_ns.gpu_check.stages``): the environment (on CUDA: gsplat's kernels, built on
first use); the backends held equal on one scene (gsplat against the CPU backends; skipped, and
said so, without CUDA); a generated scene; a short ``ns-train trace3d`` with GIT, density control
and features; ``trace3d-trace``, ``trace3d-prompt``, ``trace3d-export``, ``trace3d-eval``,
``ns-export gaussian-splat``; the viewer (server start, one frame per output); GIT time over
forward time. Each stage's output goes to ``<work>/gpu_check.log``; stdout gets only the JSON
(``ok`` per stage, seconds, details). The exit code is 0 when every stage passed, 1 otherwise.
``--device cpu`` hides any GPU (``CUDA_VISIBLE_DEVICES=``), so the whole run is the CPU path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)")
    p.add_argument("--steps", type=int, default=None, help="ns-train steps (default 300 on cuda, 60 on cpu)")
    p.add_argument("--views", type=int, default=None, help="views of the generated scene (default 24 on cuda, 10 on cpu)")
    p.add_argument("--size", type=int, default=None, help="image side of the generated scene (default 128 on cuda, 48 on cpu)")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary folder)")
    return p


class _Redirect:
    """Sends stdout and stderr to a log file: file descriptors 1 and 2 (native output, child
    processes) and Python's `sys.stdout` / `sys.stderr` (whatever objects they are now)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> "_Redirect":
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = os.dup(1), os.dup(2)
        self.log = open(self.path, "a", buffering=1)
        os.dup2(self.log.fileno(), 1)
        os.dup2(self.log.fileno(), 2)
        self.streams = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self.log
        return self

    def write(self, text: str) -> None:
        self.log.write(text.rstrip("\n") + "\n")

    def __exit__(self, *exc) -> None:
        self.log.flush()
        sys.stdout, sys.stderr = self.streams
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.log.close()


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps is not None and args.steps < 12:
        print("gpu_check: error: --steps must be at least 12 (GIT, features and two density cycles fit in)", file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    if not cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: every stage runs on the CPU
    work = args.work or Path(tempfile.mkdtemp(prefix="trace3d_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "gpu_check.log"
    start = time.perf_counter()
    with _Redirect(log_path) as log:
        from trace3d_ns.gpu_check.stages import Check, run_stages

        check = Check(
            device=args.device, steps=args.steps or (300 if cuda else 60), work=work,
            views=args.views or (24 if cuda else 10), size=args.size or (128 if cuda else 48),
        )
        stages = run_stages(check, log.write)
    report = {
        "ok": all(s["ok"] for s in stages.values()),
        "device": args.device,
        "steps": check.steps,
        "total_s": time.perf_counter() - start,
        "work": str(work),
        "log": str(log_path),
        "stages": stages,
    }
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
