#!/usr/bin/env bash
# The demo: set up, generate a scene with SAM-like masks, train trace3d on the CPU (RGB warm-up,
# then Gaussian Instance Tracing and contrastive feature lifting, compiled CPU rasterizer), export
# the segmented Gaussians, and draw one overview PNG of a few test views.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]      (default: ./demo_out)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT="$(mkdir -p "${1:-$ROOT/demo_out}" && cd "${1:-$ROOT/demo_out}" && pwd)"
STEPS="${TRACE3D_DEMO_STEPS:-1200}"
GIT_STEP="${TRACE3D_DEMO_GIT_STEP:-500}"
SIZE="${TRACE3D_DEMO_SIZE:-128}"
START=$SECONDS

echo "[demo] generating the demo scene in $OUT/scene"
trace3d-scene --out "$OUT/scene" --objects 5 --views 40 --size "$SIZE" --seed 0 --sam-like-masks --overwrite

echo "[demo] training trace3d on the CPU: $STEPS steps, Gaussian Instance Tracing at step $GIT_STEP"
ns-train trace3d --data "$OUT/scene" --output-dir "$OUT/outputs" --experiment-name demo --timestamp demo \
  --machine.device-type cpu --vis tensorboard --max-num-iterations "$STEPS" --steps-per-save "$STEPS" \
  --pipeline.git-step "$GIT_STEP" --pipeline.model.feature-start-step "$GIT_STEP" \
  --pipeline.model.num-downscales 0 \
  --pipeline.datamanager.mask-source folder --pipeline.datamanager.folder.directory sam_masks
CONFIG="$OUT/outputs/demo/trace3d/demo/config.yml"

echo "[demo] exporting every instance (trace3d-export) and the whole scene (ns-export)"
trace3d-export --load-config "$CONFIG" --output-dir "$OUT/export/instances" --min-gaussians 50
ns-export gaussian-splat --load-config "$CONFIG" --output-dir "$OUT/export"

echo "[demo] drawing the overview of a few test views"
python -m trace3d_ns.figure --load-config "$CONFIG" --out "$OUT/overview.png" >/dev/null

cat <<MSG

[demo] done in $((SECONDS - START)) s. Outputs:
  overview (test image | render | instances | feature PCA | objects alone):  $OUT/overview.png
  scene (images, GT instances, SAM-like masks):  $OUT/scene
  trained model config:                          $CONFIG
  checkpoints and tensorboard logs:              $OUT/outputs/demo/trace3d/demo
  consistent instance maps (mask cache):         $OUT/scene/.trace3d_cache/consistent-*.npz
  one .ply per instance + instances.json:        $OUT/export/instances
  all Gaussians (3DGS .ply):                     $OUT/export/splat.ply
Look at it in the viewer:  $VENV/bin/ns-viewer --load-config $CONFIG   (then open http://localhost:7007)
Your own scene: SAM masks need a checkpoint (--pipeline.datamanager.mask-source sam --pipeline.datamanager.sam.checkpoint F);
  without SAM weights use --pipeline.datamanager.mask-source levels (whole objects; superpixel gives parts). See README.
MSG
