#!/usr/bin/env bash
# GPU correctness + speed in one call (DESIGN.md §6). Usage: bash bench/gpu_check.sh OUT_DIR
# Builds in place with the torch/triton/pybind11/scikit-build-core already installed (no network),
# runs the gpu-marked tests, the benchmarks and the torchrun scale-out throughput (nccl, world
# size 1), and writes logs + tables to OUT_DIR. RK_GPU_PARTS picks parts (default: all three:
# "tests bench scaleout"), to split the work over several 10-minute device calls.
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
PARTS=${RK_GPU_PARTS:-tests bench scaleout}
if [[ " $PARTS " == *" tests "* ]]; then
  timeout 300 python3 -m pytest tests -q -m gpu -x 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
fi
if [[ " $PARTS " == *" bench "* ]]; then
  # one JSON per bench file, each under its own time limit (RK_GPU_BENCH_S seconds, default 150),
  # so one slow file cannot starve the others inside a 10-minute device call
  for f in bench/bench_*.py; do
    name=$(basename "$f" .py)
    timeout "${RK_GPU_BENCH_S:-150}" python3 -m pytest "$f" --benchmark-only -q \
      --benchmark-json="$OUT/$name.json" --benchmark-columns=min,median,max,rounds 2>&1 \
      | tail -25 | tee "$OUT/$name.txt"
  done
  python3 bench/report.py "$OUT"/bench_*.json | tee "$OUT/RESULTS.md"
fi
if [[ " $PARTS " == *" scaleout "* ]]; then
  # MaRio training tokens/s and COLLATE candidate-generation tokens/s under torchrun (nccl)
  timeout "${RK_GPU_SCALEOUT_S:-300}" python3 bench/scaleout.py --nproc 1 --device cuda \
    --out "$OUT" 2>&1 | tail -20 | tee "$OUT/scaleout.txt"
fi
