#!/usr/bin/env bash
# The README's test command: makes the environment if needed, then runs the fast test tier.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -m slow`, `bash launch/test.sh tests/ops`).
# Test files run in TOKENFLOW_TEST_WORKERS pytest-xdist processes (default 2, one per core of the 2-core machines
# CI and the README assume; 0 = one process). Whole files go to one worker (--dist loadfile) so a module's
# fixtures and compiled programs are built once. The suite is XLA-compile bound and each compile is single-threaded,
# so two workers use both cores; each worker peaks near 5 GiB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec "${TOKENFLOW_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -n "${TOKENFLOW_TEST_WORKERS:-2}" --dist loadfile "$@"
