#!/usr/bin/env bash
# N processes of one tokenflow-jax command on this machine, joined into one JAX runtime: a multi-host run in
# miniature (CPU devices talk over gloo), or one process per group of local GPUs.
#
#   bash launch/local_multiprocess.sh N COMMAND [ARGS...]
#
#   bash launch/local_multiprocess.sh 2 train --config configs/tokenizer.py:tiny --workdir out/tokenizer_2proc
#   GPUS=0,1,2,3 bash launch/local_multiprocess.sh 2 train --config configs/t2i.py:tiny --workdir out/t2i_2proc
#
# Process i gets TOKENFLOW_COORDINATOR=127.0.0.1:PORT, TOKENFLOW_NUM_PROCESSES=N and TOKENFLOW_PROCESS_ID=i
# (tokenflow_jax/distributed.py). Without GPUS, each process has DEVICES_PER_PROCESS fake CPU devices (default
# 4; the configs' meshes then span N x 4 devices); with GPUS, each process sees its equal share of those GPUs.
# Process 0 prints to the terminal; every process logs to LOG_DIR/process_I.log (default out/multiprocess_logs).
# When a process fails the others are stopped, and the exit status is the failed process's.
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
N="$1"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
source "$ROOT/launch/env.sh"
cd "$ROOT"
TF="${TOKENFLOW_VENV:-$ROOT/.venv}/bin/tokenflow-jax"
LOG_DIR="${LOG_DIR:-out/multiprocess_logs}"
mkdir -p "$LOG_DIR"
PORT="${PORT:-$("${TOKENFLOW_VENV:-$ROOT/.venv}/bin/python" -c 'import portpicker; print(portpicker.pick_unused_port())')}"

if [ -n "${GPUS:-}" ]; then
  IFS=, read -r -a gpu_list <<< "$GPUS"
  if [ $(( ${#gpu_list[@]} % N )) -ne 0 ]; then
    echo "[local_multiprocess] GPUS=$GPUS has ${#gpu_list[@]} GPUs, not a multiple of $N processes" >&2
    exit 2
  fi
  per=$(( ${#gpu_list[@]} / N ))
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for (( i = 0; i < N; i++ )); do
  env_args=(TOKENFLOW_COORDINATOR="127.0.0.1:$PORT" TOKENFLOW_NUM_PROCESSES="$N" TOKENFLOW_PROCESS_ID="$i")
  if [ -n "${GPUS:-}" ]; then
    share="$(IFS=,; echo "${gpu_list[*]:$(( i * per )):$per}")"
    env_args+=(CUDA_VISIBLE_DEVICES="$share")
  else
    env_args+=(JAX_PLATFORMS=cpu
               XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}")
  fi
  log="$LOG_DIR/process_$i.log"
  if [ "$i" -eq 0 ]; then
    env "${env_args[@]}" "$TF" "$@" > >(tee "$log") 2>&1 &
  else
    env "${env_args[@]}" "$TF" "$@" > "$log" 2>&1 &
  fi
  pids+=($!)
done
echo "[local_multiprocess] $N processes (pids ${pids[*]}), coordinator 127.0.0.1:$PORT, logs in $LOG_DIR" >&2

status=0
for (( k = 0; k < N; k++ )); do
  wait -n && continue  # the next process to finish, whichever it is
  status=$?
  echo "[local_multiprocess] a process failed (exit $status): stopping the others; see $LOG_DIR" >&2
  stop_all
  wait || true
  break
done
exit "$status"
