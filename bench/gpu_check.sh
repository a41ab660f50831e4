#!/usr/bin/env bash
# GPU correctness + speed in one call (DESIGN.md §6). Usage: bash bench/gpu_check.sh OUT_DIR
# Builds in place with the torch/triton/pybind11/scikit-build-core already installed (no network),
# runs the gpu-marked tests and the benchmarks, and writes logs + tables to OUT_DIR.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"
RK_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import rationale_kernels as rk; print(rk.build_info())" | tee -a "$OUT/env.txt"
timeout 300 python3 -m pytest tests -q -m gpu -x 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
timeout 400 python3 -m pytest bench --benchmark-only -q --benchmark-json="$OUT/bench.json" \
  --benchmark-columns=min,median,max,rounds 2>&1 | tail -40 | tee "$OUT/bench.txt"
python3 bench/report.py "$OUT/bench.json" | tee "$OUT/RESULTS.md"
