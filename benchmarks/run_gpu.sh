#!/usr/bin/env bash
# On a machine with a CUDA GPU and torch, triton and cupy already installed (no network, no pip): the GPU
# tests and the full benchmark, and where named the launch-configuration sweep, in one command that ends within
# a budget.
#
#   benchmarks/run_gpu.sh OUTDIR [tests] [bench] [tune]      (no phase named: tests and bench, in that order)
#   RUN_GPU_BUDGET_S=540 (default): seconds for the whole script
#   RUN_GPU_TESTS: the test files to run instead of the GPU list below
#   RUN_GPU_PROFILE_S=90 (default): seconds for the host-time profiles run with the bench (0: none)
#   RUN_GPU_BENCH_ARGS, RUN_GPU_TUNE_ARGS: more options for adam-gpu bench / tune (on a CPU, to check this
#   script: RUN_GPU_BENCH_ARGS="--quick --device cpu" RUN_GPU_TUNE_ARGS="--quick --device cpu" TRITON_INTERPRET=1)
#
# Made for a lent GPU whose session has 15 minutes of device time, the machine's start included, and 10
# minutes a command: one call with timeout_s=600 runs the tests and the whole benchmark (the second H200 run,
# with the sweep as well, measured 40 of the 48 pairs: the sweep is named only where its constants are in
# question, e.g. `run_gpu.sh OUT tune` on a still-warm machine), and what it measured comes back even where
# a phase is cut short. Each phase ends by its own time limit, leaving the later phases their minimum
# (bench 150 s, tune 90 s); a phase run alone gets the whole budget. The benchmark starts its headline cases
# first and starts no case after its limit; the sweep measures each backend's default first, then the
# configurations nearest to it; both write their JSON after every measurement and draw table and plot from it.
#
# OUTDIR receives at most 8 files (what the device tool brings back), refreshed after every phase:
# summary.md (GPU, phase statuses, failed tests, the benchmark's targets, the sweep's winners; also printed
# last), tests.log, results.json, results.md, results.png, tune.json, tune.md, and logs.tar.gz (info.log,
# profile.log (host time of eager steps, by function), wheels.log where wheels were installed, tests.xml,
# bench.log, tune.log). Commit them under benchmarks/results/<date>-<gpu>/.
set -uo pipefail
out="$(mkdir -p "${1:?usage: benchmarks/run_gpu.sh OUTDIR [tests] [bench] [tune]}" && cd "$1" && pwd)"
shift
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(tests bench)
for phase in "${phases[@]}"; do
  case "$phase" in tests | bench | tune) ;; *) echo "unknown phase '$phase': tests, bench, tune" >&2; exit 2 ;; esac
done
budget="${RUN_GPU_BUDGET_S:-540}"
deadline=$((SECONDS + budget))
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"

# The installed layout without pip (no network, no build step): adam_gpu with kernels/ as adam_gpu.kernels,
# beside the tests. Everything runs from there: `python -m` puts the working directory first on sys.path,
# and the checkout's adam_gpu/ has no kernels/ inside.
stage="$(mktemp -d)"
cp -r "$repo/adam_gpu" "$repo/tests" "$repo/pyproject.toml" "$stage/"
cp -r "$repo/kernels" "$stage/adam_gpu/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$stage"
# Baselines the GPU image lacks (bitsandbytes, torchao) travel as wheels in the checkout's ignored .whl/
# (benchmarks/README.md says how to fetch them): installed beside the stage, after it on the path, offline,
# without dependencies (the image has torch, numpy and packaging).
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
  python -m pip install --no-index --no-deps --no-compile --target "$stage/site" "$repo"/.whl/*.whl \
    >"$work/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$stage/site"
fi

selected() { [[ " ${phases[*]} " == *" $1 "* ]]; }
# Seconds phase $1 may take: at most $2 (when a later phase is selected), and no more than what is left of
# the budget less the minimum of each later selected phase (bench 150 s, tune 90 s) and 10 s for the summary.
share() {
  local reserve=0 later=0 phase
  for phase in tests bench tune; do
    if [ "$phase" = "$1" ]; then later=1; elif [ $later -eq 1 ] && selected "$phase"; then
      case "$phase" in bench) reserve=$((reserve + 150)) ;; tune) reserve=$((reserve + 90)) ;; esac
    fi
  done
  local left=$((deadline - SECONDS - reserve - 10))
  [ $reserve -gt 0 ] && [ "$left" -gt "$2" ] && left=$2
  echo $((left > 30 ? left : 30))
}
declare -A status

publish() {
  local file
  for file in tests.log results.json results.md results.png tune.json tune.md; do
    [ -f "$work/$file" ] && cp "$work/$file" "$out/"
  done
  tar -czf "$out/logs.tar.gz" -C "$work" $(cd "$work" && ls info.log profile.log wheels.log tests.xml bench.log tune.log 2>/dev/null)
  {
    echo "# GPU run, $(date -u +%Y-%m-%d)"
    echo
    echo '```'
    cat "$work/info.log"
    echo '```'
    echo
    for phase in "${phases[@]}"; do echo "- $phase: ${status[$phase]:-not run}"; done
    if [ -f "$work/profile.log" ]; then
      echo; echo "## Host time of eager steps (profile.log in logs.tar.gz)"; echo
      grep -E "ms a step|: exit " "$work/profile.log" | sed 's/^/- /'
    fi
    if [ -f "$work/tests.log" ]; then
      echo; echo "## Tests"; echo; echo '```'
      grep -E '^(FAILED|ERROR) ' "$work/tests.log" | cut -c1-300 | head -60
      grep -E '[0-9]+ (passed|failed|skipped)|no tests ran|Timeout' "$work/tests.log" | tail -3
      echo '```'
      echo; echo "Skipped, by reason:"; echo; echo '```'
      grep -E '^SKIPPED \[' "$work/tests.log" | sed -E 's/^SKIPPED \[([0-9]+)\] [^ ]+: /\1 /' |
        awk '{n=$1; $1=""; count[$0]+=n} END {for (r in count) print count[r] r}' | sort -rn | cut -c1-200 | head -15
      echo '```'
    fi
    if [ -f "$work/results.md" ]; then
      echo; echo "## Benchmark"; echo
      grep -E '^- (device|copy bandwidth|\*\*stopped)' "$work/results.md" | cut -c1-400
      sed -n '/^## Targets/,/^## /p' "$work/results.md" | sed '$d'
    fi
    if [ -f "$work/tune.log" ]; then
      echo; echo "## Launch-configuration sweep"; echo
      grep -E 'best overall|cannot run|time limit' "$work/tune.log" | sed 's/^/- /'
    fi
  } >"$out/summary.md"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  python -m adam_gpu.cli info
  python -c "import importlib.util as u; print('baselines importable:', {m: u.find_spec(m) is not None for m in
    ('apex', 'transformer_engine', 'bitsandbytes', 'torchao')})"
} >"$work/info.log" 2>&1
cat "$work/info.log"
# Where eager steps spend their host time (benchmarks/profile_step.py), with the benchmark: ResNet-50's list took
# 0.78-1.08 ms a step on the H200 runs against 0.35 on a CPU with the launch stubbed, and one tensor 0.13 ms
# (torch fused 0.045) against 0.07: the fixed cost of a step. 90 s at most in all.
if selected bench; then
  for profiled in "resnet-50|triton" "flat 2^20|triton" "resnet-50|cupy" "gpt2-124m|triton" "1000x4096|triton"; do
    left=$((${RUN_GPU_PROFILE_S:-90} - SECONDS))
    [ $left -lt 10 ] && break
    IFS='|' read -r case backend <<<"$profiled"
    timeout $left python "$repo/benchmarks/profile_step.py" --case "$case" --backend "$backend" \
      --steps "${RUN_GPU_PROFILE_STEPS:-200}" --top 25 >>"$work/profile.log" 2>&1 || echo "($profiled: exit $?)" >>"$work/profile.log"
  done
fi
[ -f "$work/profile.log" ] && grep -E "ms a step" "$work/profile.log"
publish

if selected tests; then
  # The tests that run on the GPU (every file but those tests/test_run_gpu.py names CPU-only, with why), the
  # one-step grid (1480 cases) and the property tests late: they take the longest (the property tests compile
  # the most specializations), and a timeout should cut only them; after them the training runs and the
  # torch.compile tests, which have not run on a GPU yet (inductor's compiles: time unknown). With
  # pytest-xdist (the GPU image has it) one worker per two cores, at most 8, share the GPU; the tests of more
  # than 2**31 elements (20+ GB each) stay in one worker (xdist_group "gpu-memory"), one at a time.
  gpu_tests="tests/test_gpu.py tests/test_multi_tensor.py tests/test_amp_capturable_clipping.py
    tests/test_master_weights.py tests/test_8bit.py tests/test_training.py tests/test_optimizer_api.py
    tests/test_step_cache.py tests/test_state_changes.py tests/test_torch_conformance.py tests/test_bad_input.py tests/test_reference.py tests/test_faults.py
    tests/test_determinism.py tests/test_checkpoint.py tests/test_capture.py tests/test_quantization.py
    tests/test_step.py tests/test_properties.py tests/test_convergence.py tests/test_compile.py
    tests/test_torch_compile.py tests/test_compiled_launch.py"
  # Each worker's torch gets its share of the cores for its CPU work (the float64 references); by default every
  # worker takes them all. In the first H200 run (without this) one-step tests took 10-14 s each where one takes
  # 0.15 s alone on a CPU, and 2 of the 16 files were reached in 190 s; with it, the second run's whole list took
  # 60 s. --durations lists the slowest tests in tests.log.
  parallel=()
  if python -c "import xdist" 2>/dev/null; then
    workers=$(($(nproc) / 2)); workers=$((workers > 8 ? 8 : workers < 1 ? 1 : workers))
    parallel=(-n "$workers" --dist loadgroup)
  fi
  threads=$(($(nproc) / ${workers:-1}))
  limit=$(share tests 210)
  echo "== tests at ${SECONDS} s (interrupted at $((limit - 20)) s)"
  # SIGINT at the limit: pytest stops as on Ctrl-C and still prints its summary (failures, skips, counts).
  OMP_NUM_THREADS=$threads timeout --signal=INT --kill-after=20 $((limit - 20)) python -m pytest -q -rfEs --durations=25 -p no:cacheprovider \
    --continue-on-collection-errors "${parallel[@]}" ${RUN_GPU_TESTS:-$gpu_tests} \
    --junitxml="$work/tests.xml" >"$work/tests.log" 2>&1
  code=$?
  status[tests]="exit $code$([ $code -eq 124 ] && echo " (interrupted at its $((limit - 20)) s limit)")"
  tail -5 "$work/tests.log"
  publish
fi

# Phase $1 (bench or tune): `adam-gpu $1` starts no measurement after its limit less $2 s and is killed at the
# limit; where it was killed, its table is drawn from the JSON ($3) it wrote after each measurement.
measure() {
  local phase=$1 margin=$2 json=$3 extra=$4 limit code
  limit=$(share "$phase" "$budget")
  echo "== $phase at ${SECONDS} s (nothing started after $((limit - margin)) s, killed at ${limit} s)"
  timeout "$limit" python -m adam_gpu.cli "$phase" --out "$work" --time-limit $((limit - margin)) $extra \
    >"$work/$phase.log" 2>&1
  code=$?
  if [ $code -ne 0 ] && [ -f "$work/$json" ]; then
    python -m adam_gpu.cli "$phase" --report "$work/$json" >>"$work/$phase.log" 2>&1
  fi
  status[$phase]="exit $code"
  tail -3 "$work/$phase.log"
  publish
}
selected bench && measure bench 40 results.json "${RUN_GPU_BENCH_ARGS:-}"
selected tune && measure tune 30 tune.json "${RUN_GPU_TUNE_ARGS:-}"

echo "== done in ${SECONDS} s; ${out}:"
ls "$out"
cat "$out/summary.md"
failed=0
for phase in "${phases[@]}"; do [ "${status[$phase]:-}" = "exit 0" ] || failed=1; done
exit $failed
