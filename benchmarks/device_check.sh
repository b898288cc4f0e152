#!/usr/bin/env bash
# The device check: on a machine with one GPU, one command runs the gpu-marked tests and the kernel benchmark grid
# and writes everything under one folder, so a few minutes of a lent GPU give every GPU figure of the project.
#
#     bash benchmarks/device_check.sh [OUT]        # OUT defaults to $OUT, else benchmarks/results/device_check
#
# Steps (each with its own time limit, so one hang cannot eat the others; at most 8 minutes in all):
#   gpu_tests     ATTN_TEST_ACCELERATOR=1 pytest -m gpu tests/pallas_kernels   (flash, lightning, block-sparse and
#                 decode kernels compiled for the GPU against their references)       <= 150 s
#   kernels       eval.bench --suite kernels: flash vs cuDNN vs XLA vs JAX's Pallas op, lightning; 1K-32K  <= 180 s
#   block_sparse  eval.bench --suite block_sparse --quick                                                   <= 45 s
#   decode        eval.bench --suite decode --quick                                                         <= 45 s
#   lca           eval.lca --part kernels, T = 8192: LCA-bench mask patterns x implementations, fwd, fwd+bwd  <= 60 s
# OUT/summary.txt has one "step rc=N" line per step (124: stopped at its limit), OUT/<step>.log the output,
# OUT/<suite>_gpu.json/.png the benchmark reports (commit them under benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results/device_check}}"
mkdir -p "$out"
: > "$out/summary.txt"
python -c "import jax; print(jax.__version__, jax.devices())" > "$out/devices.txt" 2>&1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$?" | tee -a "$out/summary.txt"
}

step gpu_tests 150 env ATTN_TEST_ACCELERATOR=1 python -m pytest -q -m gpu tests/pallas_kernels \
  --junitxml="$out/gpu_tests.xml"
step kernels 180 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m eval.bench --suite kernels \
  --memory-limit-gib 70 --output-dir "$out"
step block_sparse 45 python -m eval.bench --suite block_sparse --quick --output-dir "$out"
step decode 45 python -m eval.bench --suite decode --quick --output-dir "$out"
step lca 60 python -m eval.lca --part kernels --lengths 8192 --memory-limit-gib 70 --output-dir "$out"
cat "$out/summary.txt"
