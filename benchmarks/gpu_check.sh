#!/usr/bin/env bash
# GPU check of the fused sampling kernels, under 8 minutes on one H200.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# 1. the kernel tests, compiled for the GPU (TRITON_INTERPRET=0), with the reference tests;
# 2. the microbenchmarks (CSV + PNG).
# Leaves OUT_DIR/gpu_check.log, OUT_DIR/kernel_bench.csv and OUT_DIR/kernel_bench.png.
# Needs only what the project already depends on (torch, triton, transformers, pytest,
# matplotlib); installs nothing.
set -uo pipefail

out_dir=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
cd "$(dirname "$0")/.."
log="$out_dir/gpu_check.log"
# The kernels folder installs as the package proxytune_kernels; without an
# install, a link of that name on PYTHONPATH stands in for it.
shim=$(mktemp -d)
ln -s "$PWD/kernels" "$shim/proxytune_kernels"
export PYTHONPATH="$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 PROXYTUNE_SAMPLER=auto TOKENIZERS_PARALLELISM=false

{
  echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python - <<'PY'
import torch, triton
assert torch.cuda.is_available(), "no CUDA device: run this on the GPU machine"
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name())
PY
} 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

echo "== kernel tests (compiled)" | tee -a "$log"
timeout 200 python -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py tests/test_sampling_reference.py 2>&1 | tee -a "$log"
tests_status=${PIPESTATUS[0]}

echo "== microbenchmarks" | tee -a "$log"
timeout 330 python benchmarks/kernel_bench.py --out "$out_dir" \
  --compile-vocabs 128256 --compile-batches 1 64 --compile-pairs 1 2>&1 | tee -a "$log"
bench_status=${PIPESTATUS[0]}

echo "== tests exit $tests_status, benchmark exit $bench_status" | tee -a "$log"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
