#!/usr/bin/env bash
# One command that exercises everything a user does and prints one JSON object with `ok` per stage
# and timings (see trace3d_ns/gpu_check/__main__.py); exits non-zero if any stage fails.
# Usage: bash scripts/gpu_check.sh [--device cuda|cpu] [--steps N] [--work DIR]
#   --device cuda (default): gsplat against the CPU backends, then the user path on the GPU (<= 5 min)
#   --device cpu: the same path on the CPU (the gsplat comparison is skipped, and the report says so)
# Uses the README's set-up (.venv); TRACE3D_PYTHON=/path/to/python uses that interpreter instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${TRACE3D_PYTHON:-}" ]; then
  PY="$TRACE3D_PYTHON"
else
  source "$ROOT/scripts/setup_env.sh" >&2
fi
exec "$PY" -m trace3d_ns.gpu_check "$@"
