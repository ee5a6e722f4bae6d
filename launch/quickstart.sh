#!/usr/bin/env bash
# The README's first command: makes the environment if needed, then runs the main job on built-in
# data. Until the training recipes land this is a tokenizer reconstruction of the sample photos that
# ship with scikit-image (tiny config, random weights unless CHECKPOINT is set).
#
#   bash launch/quickstart.sh [OUT_DIR]        (default out/quickstart)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
source "$ROOT/launch/env.sh"
cd "$ROOT"
OUT="${1:-out/quickstart}"
ARGS=(reconstruct --config "${CONFIG:-configs/tokenizer.py:tiny}" --images builtin --out "$OUT")
if [ -n "${CHECKPOINT:-}" ]; then ARGS+=(--checkpoint "$CHECKPOINT"); fi
exec "${TOKENFLOW_VENV:-$ROOT/.venv}/bin/tokenflow-jax" "${ARGS[@]}"
