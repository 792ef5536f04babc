#!/usr/bin/env bash
# Everything a CUDA machine can tell about the fused CUDA path, in one run (about 5-8 min
# on an H200): the CUDA tests (tests/test_cuda.py covers every state_dtype on the device;
# tests/test_triton_encoded.py runs the same kernel in Triton's interpreter), the suite
# under xdist, then the step, compiled-step and training-iteration benchmarks. Assumes
# torch with CUDA and Triton are installed.
#   bash benchmarks/cuda_checks.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-cuda-checks}
mkdir -p "$out"
python -m pip install -q -e ".[dev]" --no-deps 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q tests/test_cuda.py tests/test_triton_encoded.py tests/test_projection_triton.py tests/test_fused.py tests/test_compile.py 2>&1 | tail -15 | tee "$out/tests_cuda.txt"
python -m pytest -q -n auto -x 2>&1 | tail -5 | tee "$out/tests_xdist.txt"
python benchmarks/step_time.py --device cuda --out "$out/results_cuda.json" | tee "$out/step_time.txt"
python benchmarks/compiled_step.py --device cuda --out "$out/results_compiled_step_cuda.json" | tee "$out/compiled_step.txt"
python benchmarks/estimating_step.py --device cuda --out "$out/results_estimating_step_cuda.json" | tee "$out/estimating_step.txt"
python benchmarks/estimating_step_cuda.py --device cuda --out "$out/results_estimating_step_cuda_path.json" | tee "$out/estimating_step_cuda.txt"
python benchmarks/train_step.py --device cuda --out "$out/results_train_step_cuda.json" | tee "$out/train_step.txt"
