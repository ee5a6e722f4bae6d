# Sourced by the launch scripts: compilation cache and CPU defaults shared by every command.
# The persistent compilation cache turns multi-second XLA compiles into reloads on reruns.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tokenflow_jax/jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:-0}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# On a machine with no TPU (/dev/accel*, /dev/vfio) and no NVIDIA GPU, run on the CPU without probing for a
# TPU: libtpu (installed for `tokenflow-jax compile`) otherwise prints "could not determine TPU accelerator
# type" on every start. AOT compiles for TPU topologies (jax.experimental.topologies.get_topology_desc, jax[tpu]
# 0.10.2 with libtpu 0.0.42) work with JAX_PLATFORMS=cpu.
if [ -z "${JAX_PLATFORMS:-}" ] && ! ls /dev/accel* /dev/vfio >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
  export JAX_PLATFORMS=cpu
fi
