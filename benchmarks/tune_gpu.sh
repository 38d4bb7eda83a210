#!/usr/bin/env bash
# On a machine with a CUDA GPU and torch, triton and cupy already installed (no network needed): the sweep
# of the kernel backends' launch configurations (`adam-gpu tune`), with log, JSON and Markdown in OUTDIR.
# The second command of a GPU session, after run_gpu.sh. Fits in 8 minutes: the sweep (estimated 5.5 minutes
# on an H100) starts no configuration after 400 s and is killed at 450 s; either way the JSON holds every
# configuration finished (it is written after each) and the Markdown is drawn from it.
#
#   benchmarks/tune_gpu.sh OUTDIR [more adam-gpu tune options, e.g. --backends triton]
# (On a CPU, `TRITON_INTERPRET=1 benchmarks/tune_gpu.sh OUTDIR --quick --device cpu` checks the script.)
set -uo pipefail
out="$(mkdir -p "${1:?usage: benchmarks/tune_gpu.sh OUTDIR [adam-gpu tune options]}" && cd "$1" && pwd)"
shift
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

# Staged as run_gpu.sh stages it: adam_gpu with kernels/ as adam_gpu.kernels, no pip, no build step.
stage="$(mktemp -d)"
cp -r adam_gpu pyproject.toml "$stage/"
cp -r kernels "$stage/adam_gpu/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
cd "$stage"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  python -m adam_gpu.cli info
} 2>&1 | tee "$out/info.log"

timeout 450 python -m adam_gpu.cli tune --time-limit 400 --out "$out" "$@" 2>&1 | tee "$out/tune.log"
tune_status=${PIPESTATUS[0]}
if [ "$tune_status" -ne 0 ] && [ -f "$out/tune.json" ]; then
  python -m adam_gpu.cli tune --report "$out/tune.json" 2>&1 | tee -a "$out/tune.log"
fi

echo "tune exit $tune_status" | tee "$out/status.txt"
[ "$tune_status" -eq 0 ]
