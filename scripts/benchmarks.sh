#!/usr/bin/env bash
# BENCHMARKS.md: the Table-5 ablation on a generated scene with SAM-like masks and NVOS foreground
# metrics on DTU scan 37 and the Blender LEGO, trained and measured on the CPU (about 1.5-2 hours on 2 cores).
# Usage: bash scripts/benchmarks.sh [WORK_DIR]   (default ./benchmark_runs; finished runs are reused)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$VENV/bin/python" -m trace3d_ns.benchmarks.report --out BENCHMARKS.md --work "${1:-$ROOT/benchmark_runs}" --json-dir docs/benchmarks
