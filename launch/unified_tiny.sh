#!/usr/bin/env bash
# One unified decoder for generation and understanding, on built-in data, against the demo's two separate models:
#   1. the demo (`tokenflow-jax demo --workdir $DEMO_DIR`, default out/demo) if it has not run yet: its tokenizer,
#      token shards, separate `tiny` t2i model and VLM, and their ShapesEval and Shapes-VQA results,
#   2. `train --config configs/unified.py:tiny` on the demo's token shards and tokenizer (~13 min on 2 cores),
#   3. `eval-shapes --rerank 4` (1- and 3-step, with the self-judged rows) and `eval-vqa` on the unified checkpoint,
#   4. `generate --rerank 4`: samples for held-out prompts, each the best of 4 candidates by the model's own judge,
#   5. OUT/comparison.md: unified vs separate per category, chance and ceiling, and the reranking table.
#
#   bash launch/unified_tiny.sh [OUT_DIR] [--config.optim.lr=... ...]   (default out/unified_tiny)
#
# Every stage resumes or skips finished work, so re-running the command continues where it stopped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
source "$ROOT/launch/env.sh"
cd "$ROOT"
OUT="out/unified_tiny"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then OUT="$1"; shift; fi
DEMO="${DEMO_DIR:-out/demo}"
TF="${TOKENFLOW_VENV:-$ROOT/.venv}/bin/tokenflow-jax"
PY="${TOKENFLOW_VENV:-$ROOT/.venv}/bin/python"

[ -f "$DEMO/report.md" ] || "$TF" demo --workdir "$DEMO"
# The demo's tokenizer was trained with its own overrides of configs/tokenizer.py:tiny; the unified run reads them.
TOKENIZER_OVERRIDES="$("$PY" -c "
from tokenflow_jax import config
print(repr(tuple(config.build_config('configs/demo.py').tokenizer.overrides)))")"
"$TF" train --config configs/unified.py:tiny --workdir "$OUT/train" --config.data.t2i.tokenized="$DEMO/tokens" \
    --config.tokenizer.checkpoint="$DEMO/tokenizer/checkpoints" --config.tokenizer.overrides="$TOKENIZER_OVERRIDES" "$@"
"$TF" eval-shapes --config configs/sample.py:tiny --checkpoint "$OUT/train/checkpoints" --loops 1,3 \
    --num-per-category 20 --rerank 4 --out "$OUT/shapes_eval.json"
"$TF" eval-vqa --checkpoint "$OUT/train/checkpoints" --num-per-category 50 --out "$OUT/vqa_eval.json"
"$PY" -c "
from tokenflow_jax.shapes import detector as shapes_eval
open('$OUT/prompts.txt', 'w').write(''.join(p.text + '\n' for p in shapes_eval.make_prompts(2, seed=7)))"
"$TF" generate --config configs/sample.py:tiny --checkpoint "$OUT/train/checkpoints" --prompts "$OUT/prompts.txt" \
    --out "$OUT/samples" --per-prompt 4 --rerank 4
"$PY" -m tokenflow_jax.apps.unified_report --demo "$DEMO" --unified "$OUT"
echo "[unified_tiny] run: $OUT/train, comparison: $OUT/comparison.md, samples: $OUT/samples/grids"
