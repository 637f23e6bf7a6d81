#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment with the pinned stack.
# Usage: source scripts/setup_env.sh   (sets PY and exports PATH with the venv's bin first)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRACE3D_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"

if ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
  echo "trace3d-ns needs Python 3.11 ($PYTHON_BIN not found). Set PYTHON_BIN to a Python 3.11 interpreter." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment at $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.trace3d-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing the pinned stack (torch 2.14.1, nerfstudio 1.1.5, gsplat 1.4.0, segment-anything 1.0); first time takes ~4 min"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip wheel
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev,sam2]"
  echo "$WANT" > "$STAMP"
fi
# open3d (imported by `ns-export`) needs libusb; install it where we can (Debian, as root).
if ! "$VENV/bin/python" -c "import open3d" >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing libusb-1.0-0 for open3d (ns-export)"
    (apt-get update -qq && apt-get install -y -qq libusb-1.0-0) >/dev/null 2>&1 || echo "[setup] warning: could not install libusb-1.0-0; ns-export will not work" >&2
  else
    echo "[setup] warning: open3d cannot load (missing libusb-1.0-0?); install it for ns-export: sudo apt-get install libusb-1.0-0" >&2
  fi
fi
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python"
