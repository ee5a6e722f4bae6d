#!/usr/bin/env bash
# The README's test command: makes the environment if needed, then runs the fast test tier.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -m slow`, `bash launch/test.sh tests/ops`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec "${TOKENFLOW_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
