#!/usr/bin/env bash
# One tokenflow-jax command on every worker of a Cloud TPU VM slice: creates the TPU (or reuses it), copies
# this checkout to every worker, installs the environment there, and runs the command on all workers at once.
#
#   bash launch/tpu_vm.sh NAME ZONE ACCELERATOR COMMAND [ARGS...]
#
#   bash launch/tpu_vm.sh tf-v5p-64 us-east5-a v5p-64 \
#       train --config configs/tokenizer.py:xl --workdir gs://BUCKET/runs/tokenizer_xl
#   QUEUED=1 SPOT=1 bash launch/tpu_vm.sh tf-v6e-64 us-east5-b v6e-64 train --config configs/t2i.py:1b ...
#
# ACCELERATOR is the slice name (v4-32, v5p-256, v5e-256 or v5litepod-256, v6e-64). Every worker runs the same
# command; tokenflow_jax/distributed.py finds the slice's other workers through the TPU metadata and JAX
# joins them into one runtime. Use a gs:// workdir so every worker reads and writes the same checkpoints
# (metrics and images go to process 0's ~/tokenflow_logs). Before booking a slice, check that the config fits:
#   tokenflow-jax compile --config configs/tokenizer.py:xl --topology v5p-64
#
# Environment:
#   PROJECT          gcloud project (default: gcloud's configured one)
#   RUNTIME          TPU software version (default: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e,
#                    v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4)
#   QUEUED=1         create through a queued resource (waits until it is ACTIVE) instead of a direct create
#   SPOT=1           spot capacity
#   SKIP_SYNC=1      do not copy the checkout / install again (a second command on a prepared slice)
#   REMOTE_DIR       checkout folder on the workers (default tokenflow_jax, under the login user's home)
#   EXTRA_ENV        'A=1 B=2' exported before the command on every worker (e.g. TOKENFLOW_HEARTBEAT_TIMEOUT=300)
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,27p' "$0" >&2
  exit 2
fi
NAME="$1"; ZONE="$2"; ACCELERATOR="$3"; shift 3
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-tokenflow_jax}"
GCLOUD=(gcloud compute tpus)
PROJECT_FLAG=()
[ -n "${PROJECT:-}" ] && PROJECT_FLAG=(--project "$PROJECT")
log() { echo "[tpu_vm] $*" >&2; }

# gcloud names v5e slices v5litepod-N.
case "$ACCELERATOR" in
  v5e-*) ACCELERATOR="v5litepod-${ACCELERATOR#v5e-}" ;;
esac
if [ -z "${RUNTIME:-}" ]; then
  case "$ACCELERATOR" in
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v4-*|v3-*|v2-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) echo "[tpu_vm] no default RUNTIME for $ACCELERATOR; set RUNTIME" >&2; exit 2 ;;
  esac
fi
SPOT_FLAG=()
[ "${SPOT:-0}" = 1 ] && SPOT_FLAG=(--spot)

# ------------------------------------------------------------------------------ create or reuse the TPU
state() { "${GCLOUD[@]}" tpu-vm describe "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --format='value(state)' 2>/dev/null || true; }
if [ -n "$(state)" ]; then
  log "reusing TPU $NAME ($(state))"
elif [ "${QUEUED:-0}" = 1 ]; then
  log "requesting $ACCELERATOR as queued resource $NAME in $ZONE ($RUNTIME)"
  "${GCLOUD[@]}" queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${SPOT_FLAG[@]}"
  while true; do
    qr="$("${GCLOUD[@]}" queued-resources describe "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
          --format='value(state.state)')"
    case "$qr" in
      ACTIVE) break ;;
      FAILED|SUSPENDED) echo "[tpu_vm] queued resource $NAME is $qr" >&2; exit 1 ;;
      *) log "queued resource $NAME: $qr; waiting"; sleep 60 ;;
    esac
  done
else
  log "creating $ACCELERATOR TPU $NAME in $ZONE ($RUNTIME)"
  "${GCLOUD[@]}" tpu-vm create "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --accelerator-type "$ACCELERATOR" \
    --version "$RUNTIME" "${SPOT_FLAG[@]}"
fi
on_all_workers() {
  "${GCLOUD[@]}" tpu-vm ssh "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}

# ----------------------------------------------------------------------- copy the checkout and install
if [ "${SKIP_SYNC:-0}" != 1 ]; then
  archive="$(mktemp -t tokenflow-XXXXXX.tgz)"
  trap 'rm -f "$archive"' EXIT
  # The files git knows (tracked + untracked, not ignored): no .venv, outputs or caches.
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$archive")
  log "copying the checkout ($(du -h "$archive" | cut -f1)) to every worker"
  "${GCLOUD[@]}" tpu-vm scp "$archive" "$NAME:tokenflow_jax.tgz" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
  # setup_env.sh needs Python >= 3.11; the TPU images ship Ubuntu 22.04's 3.10.
  on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -xzf tokenflow_jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR
    PY=\$(command -v python3.12 || command -v python3.11 || true)
    if [ -z \"\$PY\" ]; then sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv >/dev/null; PY=python3.11; fi
    PYTHON=\$PY TOKENFLOW_EXTRAS=tpu,gcs bash launch/setup_env.sh"
fi

# ------------------------------------------------------------------------------- run on every worker
command="$(printf '%q ' "$@")"
log "running on every worker: tokenflow-jax $command"
on_all_workers "cd $REMOTE_DIR && source launch/env.sh && export TOKENFLOW_DISTRIBUTED=1 ${EXTRA_ENV:-} && \
  .venv/bin/tokenflow-jax $command"
