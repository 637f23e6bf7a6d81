#!/usr/bin/env bash
# BENCHMARKS.md: the Table-5 ablation on cluttered generated scenes with SAM-like masks (4 variants x 3 seeds,
# 5000 steps, 160 px; docs/benchmarks/ablation.json and one picture per variant) and NVOS foreground metrics on
# DTU scan 37 and the Blender LEGO, trained and measured on the CPU. The ablation's 12 runs are sized for the
# compiled CPU rasterizer: two at a time, one 160 px 5000-step run took about 21 min (seed 0, measured), so the
# 12 runs take about 2.2 h plus measuring; the foreground runs about 15 min.
# Usage: bash scripts/benchmarks.sh [WORK_DIR]   (default ./benchmark_runs; finished runs are reused)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$VENV/bin/python" -m trace3d_ns.benchmarks.report --out BENCHMARKS.md --work "${1:-$ROOT/benchmark_runs}" --json-dir docs/benchmarks
