#!/usr/bin/env bash
# The demo: set up, generate a scene with SAM-like masks, train trace3d on the CPU, export it.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]      (default: ./demo_out)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT="$(mkdir -p "${1:-$ROOT/demo_out}" && cd "${1:-$ROOT/demo_out}" && pwd)"
STEPS="${TRACE3D_DEMO_STEPS:-3000}"

echo "[demo] generating the demo scene in $OUT/scene"
trace3d-scene --out "$OUT/scene" --objects 5 --views 40 --size 128 --seed 0 --sam-like-masks --overwrite

echo "[demo] training trace3d on the CPU for $STEPS steps (a few minutes)"
ns-train trace3d --data "$OUT/scene" --output-dir "$OUT/outputs" --experiment-name demo --timestamp demo \
  --machine.device-type cpu --vis tensorboard --max-num-iterations "$STEPS" --steps-per-save "$STEPS" \
  --pipeline.datamanager.mask-source folder --pipeline.datamanager.folder.directory sam_masks
CONFIG="$OUT/outputs/demo/trace3d/demo/config.yml"

echo "[demo] exporting the Gaussians with ns-export"
ns-export gaussian-splat --load-config "$CONFIG" --output-dir "$OUT/export"

cat <<MSG

[demo] done. Outputs:
  scene (images, GT instances, SAM-like masks): $OUT/scene
  trained model config:                         $CONFIG
  checkpoints and tensorboard logs:             $OUT/outputs/demo/trace3d/demo
  exported Gaussians (3DGS .ply):               $OUT/export/splat.ply
Look at it in the viewer:  $VENV/bin/ns-viewer --load-config $CONFIG   (then open http://localhost:7007)
MSG
