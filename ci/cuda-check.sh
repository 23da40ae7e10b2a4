#!/usr/bin/env bash
# Compile check of the CUDA build, on a machine without a GPU: installs NVIDIA's CUDA 13 compiler from PyPI wheels
# into a cached virtual environment and runs `cargo check --features cuda --all-targets`, which also runs
# candle-kernels' build script (nvcc compiles every CUDA kernel to PTX). Nothing is run on a GPU here; see
# ci/gpu-check.sh for that.
#
# The venv and the cargo target folder live in a cache outside the clone ($EDITGUARD_CUDA_CACHE, default
# ~/.cache/editguard/cuda-check), so the first run takes ~12 minutes on 2 cores and later runs are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${EDITGUARD_CUDA_CACHE:-$HOME/.cache/editguard/cuda-check}"
venv="$cache/venv"
# Versions measured to work together (nvcc 13.4; cccl ships separately).
wheels=(nvidia-cuda-nvcc==13.4.92 nvidia-nvvm==13.4.92 nvidia-cuda-crt==13.4.92 nvidia-cuda-runtime==13.4.92
        nvidia-cuda-cccl==13.3.5.0.6)
stamp="$venv/.editguard-wheels"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${wheels[*]}" ]]; then
    echo "== installing the CUDA compiler wheels into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "${wheels[@]}"
    echo "${wheels[*]}" > "$stamp"
fi

cuda_home="$("$venv/bin/python" - <<'PY'
import pathlib, nvidia
for root in nvidia.__path__:
    candidate = pathlib.Path(root) / "cu13"
    if (candidate / "bin" / "nvcc").exists():
        print(candidate)
        break
PY
)"
if [[ -z "$cuda_home" ]]; then
    echo "cuda-check: no nvidia/cu13/bin/nvcc inside $venv (the wheels' layout changed?)" >&2
    exit 1
fi
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home"
export PATH="$cuda_home/bin:$PATH"
export LD_LIBRARY_PATH="$cuda_home/lib:${LD_LIBRARY_PATH:-}"
# nvcc 13 accepts gcc up to 14; the compute capability is fixed because there is no GPU to ask (90: Hopper).
export NVCC_CCBIN="${NVCC_CCBIN:-gcc-12}" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="$cache/target"

echo "== nvcc: $(nvcc --version | tail -1)"
echo "== cargo check --features cuda --all-targets (target folder: $CARGO_TARGET_DIR)"
start=$(date +%s)
cargo check --features cuda --all-targets
echo "== CUDA build checks ($(( $(date +%s) - start )) s)"
