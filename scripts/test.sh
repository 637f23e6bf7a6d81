#!/usr/bin/env bash
# Sets up the environment (first run ~4 min) and runs the whole test suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k rasterizer`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$PY" -m pytest -q -ra "$@"
