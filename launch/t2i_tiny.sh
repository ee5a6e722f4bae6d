#!/usr/bin/env bash
# The text-to-image recipe end to end on built-in data, CPU-sized (~45 min on 2 cores):
#   1. the `tiny` tokenizer, $TOKENIZER_STEPS (default 2000, ~33 min) steps into OUT_DIR/tokenizer, or reused
#      from $TOKENIZER_RUN (a tokenizer training workdir) when that is set,
#   2. `tokenize`: the shapes set encoded once into ArrayRecord shards,
#   3. `train`: the `tiny` next-scale t2i model on those shards,
#   4. `generate`: samples for held-out ShapesEval prompts (PNGs, a grid per prompt, manifest.jsonl),
#   5. `eval-shapes`: ShapesEval per category, 1-step vs 3-step sampling, with chance and ceiling columns.
#
#   bash launch/t2i_tiny.sh [OUT_DIR] [--config.train.num_steps=N ...]   (default out/t2i_tiny)
#
# Every stage resumes or skips finished work, so re-running the command continues where it stopped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
source "$ROOT/launch/env.sh"
cd "$ROOT"
OUT="out/t2i_tiny"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then OUT="$1"; shift; fi
TF="${TOKENFLOW_VENV:-$ROOT/.venv}/bin/tokenflow-jax"
PY="${TOKENFLOW_VENV:-$ROOT/.venv}/bin/python"
NUM_IMAGES="${NUM_IMAGES:-20000}"

# ShapesEval of the tokenizer's own reconstructions (the ceiling of any generator on it) is ~14% after the
# quick start's 300 steps and 58% after 2000: the t2i model can only be judged on a tokenizer that trained.
TOK="${TOKENIZER_RUN:-$OUT/tokenizer}"
if [ -z "${TOKENIZER_RUN:-}" ]; then
    "$TF" train --config configs/tokenizer.py:tiny --workdir "$TOK" --config.train.num_steps="${TOKENIZER_STEPS:-2000}" \
        --config.train.checkpoint_every=500
fi
"$TF" tokenize --checkpoint "$TOK/checkpoints" --data shapes --num-images "$NUM_IMAGES" --out "$OUT/tokens"
"$TF" train --config configs/t2i.py:tiny --workdir "$OUT/train" --config.data.tokenized="$OUT/tokens" \
    --config.tokenizer.checkpoint="$TOK/checkpoints" "$@"
"$TF" eval-shapes --config configs/sample.py:tiny --checkpoint "$OUT/train/checkpoints" --loops 1,3 \
    --num-per-category 20 --out "$OUT/shapes_eval.json"
"$PY" -c "
from tokenflow_jax.shapes import detector as shapes_eval
open('$OUT/prompts.txt', 'w').write(''.join(p.text + '\n' for p in shapes_eval.make_prompts(2, seed=7)))"
"$TF" generate --config configs/sample.py:tiny --checkpoint "$OUT/train/checkpoints" --prompts "$OUT/prompts.txt" \
    --out "$OUT/samples" --per-prompt 4
echo "[t2i_tiny] tokens: $OUT/tokens, run: $OUT/train (metrics.jsonl, tensorboard/), ShapesEval:" \
     "$OUT/shapes_eval.json, samples: $OUT/samples/grids"
