#!/usr/bin/env bash
# On a machine with a CUDA GPU and torch, triton and cupy already installed (no network needed):
# the GPU test suite, then the full benchmark, with logs, JSON, Markdown table and plot in OUTDIR.
# Fits in 9 minutes: the tests get at most 4.5, the benchmark the rest; a benchmark stopped by its time
# limit keeps what it measured (the JSON is written after every case) and the table and plot are drawn from it.
# The second command of the session is benchmarks/tune_gpu.sh OUTDIR2: the launch-configuration sweep.
#
#   benchmarks/run_gpu.sh OUTDIR
set -uo pipefail
out="$(mkdir -p "${1:?usage: benchmarks/run_gpu.sh OUTDIR}" && cd "$1" && pwd)"
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

# The installed layout without pip (no network, no build step): adam_gpu with kernels/ as adam_gpu.kernels,
# beside the tests. Everything runs from there: `python -m` puts the working directory first on sys.path,
# and the checkout's adam_gpu/ has no kernels/ inside.
stage="$(mktemp -d)"
cp -r adam_gpu tests pyproject.toml "$stage/"
cp -r kernels "$stage/adam_gpu/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
cd "$stage"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python -m adam_gpu.cli info
} 2>&1 | tee "$out/info.log"

# The tests that run on the GPU (the CPU-only ones, packaging and ahead-of-time compiles, stay on CI),
# the property tests last: they compile the most specializations, and a timeout should cut only them.
# With pytest-xdist (the GPU image has it), 4 workers share the GPU; the tests of more than 2**31 elements
# (20+ GB each) stay in one worker (xdist_group "gpu-memory"), one at a time.
parallel=()
if python -c "import xdist" 2>/dev/null; then parallel=(-n 4 --dist loadgroup); fi
timeout 270 python -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors "${parallel[@]}" \
  tests/test_gpu.py tests/test_step.py tests/test_multi_tensor.py tests/test_amp_capturable_clipping.py \
  tests/test_master_weights.py tests/test_8bit.py tests/test_training.py tests/test_optimizer_api.py \
  tests/test_bad_input.py \
  tests/test_reference.py tests/test_faults.py tests/test_determinism.py tests/test_checkpoint.py tests/test_capture.py \
  tests/test_properties.py \
  --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log"
tests_status=${PIPESTATUS[0]}

timeout 250 python -m adam_gpu.cli bench --out "$out" 2>&1 | tee "$out/bench.log"
bench_status=${PIPESTATUS[0]}
if [ "$bench_status" -ne 0 ] && [ -f "$out/results.json" ]; then
  python -m adam_gpu.cli bench --report "$out/results.json" 2>&1 | tee -a "$out/bench.log"
fi

echo "tests exit $tests_status, bench exit $bench_status" | tee "$out/status.txt"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
