#!/usr/bin/env bash
# BENCHMARKS.md: the Table-5 ablation on cluttered generated scenes with SAM-like masks (4 variants x 3 seeds,
# 5000 steps, 160 px; docs/benchmarks/ablation.json and one picture per variant) and NVOS foreground metrics on
# DTU scan 37 and the Blender LEGO, trained and measured on the CPU. The ablation's 12 runs are sized for the
# compiled CPU rasterizer: two at a time, one 160 px 5000-step run takes about 20 min; 9 of the 12 runs plus all
# the measuring took 136 min (2026-12-01), so all 12 take about 2.5 h; the foreground runs about 15 min more.
# Usage: bash scripts/benchmarks.sh [WORK_DIR]   (default ./benchmark_runs; finished runs are reused)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$VENV/bin/python" -m trace3d_ns.benchmarks.report --out BENCHMARKS.md --work "${1:-$ROOT/benchmark_runs}" --json-dir docs/benchmarks
