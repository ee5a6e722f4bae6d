#!/usr/bin/env bash
# One tokenflow-jax command as an xpk workload on a GKE TPU cluster (one or several slices).
#
#   CLUSTER=my-cluster TPU_TYPE=v5p-256 bash launch/xpk.sh WORKLOAD COMMAND [ARGS...]
#
#   CLUSTER=tpu-v5p TPU_TYPE=v5p-256 bash launch/xpk.sh t2i-7b \
#       train --config configs/t2i.py:7b --workdir gs://BUCKET/runs/t2i_7b
#   CLUSTER=tpu-v5e TPU_TYPE=v5litepod-256 NUM_SLICES=2 bash launch/xpk.sh tok-b \
#       train --config configs/tokenizer.py:b,res=256 --workdir gs://BUCKET/runs/tok_b
#
# Builds a Docker image with the environment installed (python:3.11-slim + launch/setup_env.sh with the tpu and
# gcs extras; rebuilt only when setup.py changes), then `xpk workload create`, which adds this checkout's
# files to it, pushes it to gcr.io/PROJECT and starts the command on every TPU host. GKE sets the worker
# variables (TPU_WORKER_HOSTNAMES, and MEGASCALE_* for several slices) that tokenflow_jax/distributed.py
# hands to JAX. Use a gs:// workdir. Check that the config fits first:
#   tokenflow-jax compile --config configs/t2i.py:7b --topology v5p-256 [--num-slices N]
#
# Environment: CLUSTER, TPU_TYPE (required); NUM_SLICES (default 1); PROJECT, ZONE (default gcloud's);
# XPK (default `xpk`; or 'python3 /path/to/xpk.py'); XPK_ARGS (more flags, e.g. '--priority=high --spot').
# Needs docker, gcloud and xpk (pip install xpk) on this machine.
set -euo pipefail
if [ $# -lt 2 ] || [ -z "${CLUSTER:-}" ] || [ -z "${TPU_TYPE:-}" ]; then
  sed -n '2,21p' "$0" >&2
  exit 2
fi
WORKLOAD="$1"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
XPK="${XPK:-xpk}"
log() { echo "[xpk] $*" >&2; }
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ZONE="${ZONE:-$(gcloud config get-value compute/zone 2>/dev/null)}"

# --------------------------------------------------------------------- this checkout, git's files only
STAGE="$(mktemp -d -t tokenflow-xpk-XXXXXX)"
trap 'rm -rf "$STAGE"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$STAGE")

# ------------------------------------------------------- the environment image (cached on setup.py's hash)
TAG="$(cat "$ROOT/setup.py" "$ROOT/launch/setup_env.sh" | sha1sum | cut -c1-12)"
BASE="tokenflow-jax-env:$TAG"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  log "building $BASE"
  cat > "$STAGE/.tokenflow-env.Dockerfile" <<'EOF'
FROM python:3.11-slim
WORKDIR /app
COPY setup.py /app/setup.py
COPY launch /app/launch
COPY tokenflow_jax /app/tokenflow_jax
COPY configs /app/configs
RUN TOKENFLOW_EXTRAS=tpu,gcs bash launch/setup_env.sh && rm -rf /root/.cache/pip
EOF
  docker build --platform=linux/amd64 -f "$STAGE/.tokenflow-env.Dockerfile" -t "$BASE" "$STAGE"
  rm -f "$STAGE/.tokenflow-env.Dockerfile"
fi

# -------------------------------------------------------------------------------------------- submit
command="$(printf '%q ' "$@")"
log "workload $WORKLOAD on $CLUSTER: ${NUM_SLICES:-1} x $TPU_TYPE: tokenflow-jax $command"
# shellcheck disable=SC2086  # XPK and XPK_ARGS are word lists on purpose
$XPK workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --tpu-type "$TPU_TYPE" \
  --num-slices "${NUM_SLICES:-1}" --project "$PROJECT" --zone "$ZONE" \
  --base-docker-image "$BASE" --script-dir "$STAGE" ${XPK_ARGS:-} \
  --command "cd /app && source launch/env.sh && export TOKENFLOW_DISTRIBUTED=1 && .venv/bin/tokenflow-jax $command"
log "follow it with: $XPK workload list --cluster $CLUSTER --project $PROJECT --zone $ZONE"
