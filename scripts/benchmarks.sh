#!/usr/bin/env bash
# BENCHMARKS.md: the Table-5 ablation on cluttered generated scenes with SAM-like masks (4 variants x 3 seeds,
# 5000 steps, 160 px; docs/benchmarks/ablation.json and one picture per variant) and NVOS foreground metrics on
# DTU scan 37 (400x300) and the Blender LEGO (200x200), trained and measured on the CPU. Each seed's RGB stage
# (steps 0-2499) trains once and its 4 variants continue from it; two runs at a time, an RGB-stage pair took
# 13 min and a variant pair 15-19 min (2026-12-01, beside other work), so the ablation trains in about 2 h;
# its 12 runs measure two at a time (about 2 min each); the foreground runs (full resolution since 2026-12-01) took
# about 17 min (DTU) and 8 min (LEGO), measuring included, one after the other (2026-12-01, little else running).
# Usage: bash scripts/benchmarks.sh [WORK_DIR]   (default ./benchmark_runs; finished runs are reused)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$VENV/bin/python" -m trace3d_ns.benchmarks.report --out BENCHMARKS.md --work "${1:-$ROOT/benchmark_runs}" --json-dir docs/benchmarks
