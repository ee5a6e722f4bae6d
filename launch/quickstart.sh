#!/usr/bin/env bash
# The README's first command: makes the environment if needed (.venv, every version pinned), then runs the demo
# on built-in data, ~15-33 minutes on a 2-core CPU machine (25 at f32 matmul ~210 GFLOP/s), nothing downloaded:
#   the `tiny` tokenizer trained on the procedural shapes set and evaluated (PSNR, LPIPS, codebook use), the set
#   tokenized, the `tiny` text-to-image model trained and scored with ShapesEval (single- vs multi-step
#   sampling), the `tiny` VLM trained on TokenFlow features and scored on Shapes-VQA; OUT_DIR/report.md.
#
#   bash launch/quickstart.sh [OUT_DIR] [--config.t2i.num_steps=N ...]     (default out/demo; see configs/demo.py)
#
# Interrupting it (Ctrl-C) saves the running stage's checkpoint; the same command continues where it stopped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
source "$ROOT/launch/env.sh"
cd "$ROOT"
OUT="out/demo"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then OUT="$1"; shift; fi
exec "${TOKENFLOW_VENV:-$ROOT/.venv}/bin/tokenflow-jax" demo --workdir "$OUT" "$@"
