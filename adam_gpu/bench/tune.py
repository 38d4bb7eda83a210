"""``adam-gpu tune``: the kernel backends' launch configurations, measured.

Each kernel backend (triton, cupy) steps FusedAdamW over a grid of its ``LaunchConfig``s
(adam_gpu/backends/launch_config.py) on a few representative cases: one large flat tensor in fp32, in bf16 with
bf16 moments and in bf16 with 8-bit moments, GPT-2's parameter list and 1000 tensors of 4096 elements. The
cases, policies, input sets, timing (``time_device``: do_bench's median with 20th/80th percentiles; CUDA-graph
replays for launch-bound cases), copy bandwidth and JSON records are the benchmark's; tune_report.py draws the
tables from the JSON.

The loop is configuration-major: every case of one configuration is measured before the next configuration
(each case keeps its params and its optimizer throughout), so a sweep stopped by its time limit leaves complete
rows for the configurations it reached. The default configuration comes first, then the others by distance from
it, so a partial sweep has searched the default's neighbourhood.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import torch

from adam_gpu import dispatch
from adam_gpu.bench import timing
from adam_gpu.bench.cases import POLICIES, Case, Policy, flat, gpt2_124m, many_small
from adam_gpu.bench.contenders import Contender, adam_gpu_unavailable, contenders
from adam_gpu.bench.records import ERROR, UNSUPPORTED, Record, Run
from adam_gpu.bench.run import environment, input_sets, launch_bound

# The backends with a launch configuration, in the order they are swept: cupy's grid needs no compiles and
# finishes early; the time it leaves goes to Triton's, which compiles every configuration.
BACKENDS = ("cupy", "triton")
# The full grids, every combination a valid LaunchConfig accepts (a block larger than its chunk is not).
GRIDS: dict[str, dict[str, tuple[int, ...]]] = {
    "triton": {"chunk": (2048, 4096, 8192, 16384, 32768), "block": (512, 1024, 2048, 4096), "num_warps": (4, 8)},
    "cupy": {
        "chunk": (2048, 4096, 8192, 16384, 32768, 65536),
        "threads_per_block": (128, 256, 512),
        "blocks_per_sm": (4, 8, 16),
    },
}
# Triton: at least 4 elements a thread (a block of 512 on 8 warps leaves 2: 4-byte loads of bf16, and a
# compile saved). Prunes 5 of the 38 valid combinations.
MIN_ELEMENTS_PER_THREAD = 4
PRUNE: dict[str, Callable[[Any], bool]] = {
    "triton": lambda config: config.block >= 32 * config.num_warps * MIN_ELEMENTS_PER_THREAD,
}
# ``--quick``: the default and this one, to check the pipeline (seconds on the CPU, under Triton's interpreter).
QUICK_ALTERNATIVES: dict[str, dict[str, int]] = {
    "triton": {"chunk": 2048, "block": 512, "num_warps": 4},
    "cupy": {"chunk": 4096, "threads_per_block": 128, "blocks_per_sm": 4},
}
# Seconds one configuration costs on an H100, for the estimate printed at the start and for splitting a time
# limit between backends. A Triton compile per specialization: 0.3-0.6 s, 2 s for 8-bit moments at BLOCK 4096
# (ahead-of-time for sm_90 on the 2-core CI machine, 2026-11-25). A do_bench per case: 25 ms warm-up, REPEAT_MS
# of steps, its estimate, the L2 flushes and the Python around them. A launch-bound case is timed as a CUDA-graph
# capture and its replays only: a replay of 1000 x 4096 takes tens of microseconds, so do_bench runs a thousand
# of them, each after a 256 MB flush. Once per sweep: copy bandwidth, the inputs, the optimizers' state, cupy's NVRTC
# compiles (a few seconds per specialization).
COMPILE_S = {"triton": 0.8, "cupy": 0.0}
MEASURE_S = 0.12
GRAPH_S = 0.3
SETUP_S = 45.0
# Milliseconds of steps per do_bench (the benchmark's 100 ms would halve the configurations a 9-minute GPU
# run reaches): 15 steps of the 2.6 ms fp32 step of 2^28 elements, hundreds of replays of the small cases.
REPEAT_MS = 40


def tune_plan(quick: bool) -> list[tuple[Case, Policy]]:
    """The (case, policy) pairs a configuration is measured on. ``quick``: a 4096-element tensor and 3 tensors of
    1000, in fp32, for a check of the whole pipeline (8-bit moments cost a fifth of a second per step under
    Triton's CPU interpreter; tests/test_tune.py runs them in two configurations itself)."""
    if quick:
        return [(flat(12), POLICIES["fp32"]), (many_small(3, 1000), POLICIES["fp32"])]
    large = flat(28)  # 7.5 GB moved per fp32 step: 2.6 ms at 2.9 TB/s, DRAM-bound, far beyond the 50 MB L2
    return [
        (large, POLICIES["fp32"]),
        (large, POLICIES["bf16"]),
        (large, POLICIES["bf16+8bit-moments"]),
        (gpt2_124m(), POLICIES["fp32"]),
        (many_small(), POLICIES["fp32"]),
    ]


def graph_timed(case: Case, device: torch.device) -> bool:
    """Whether the case's steps are timed as CUDA-graph replays (so its optimizer must be capturable): only the
    replay is ranked, as the eager time of a launch-bound step is the host's, which no configuration changes."""
    return device.type == "cuda" and launch_bound(case)


@dataclass
class TuneRecord(Record):
    """One backend stepping one (case, policy) in one launch configuration.

    ``config`` is the ``LaunchConfig`` as a dict ({} for a pair the backend cannot run); ``default_config`` says
    whether it is the backend's default. ``ranked_ms`` (the CUDA-graph median where measured, else the eager
    median) is what configurations are compared by, and ``gbps``/``pct_copy`` are computed from it.
    ``first_step_s``: wall seconds of the first step in this configuration, where Triton compiles it.
    """

    backend: str = ""
    config: dict[str, int] = field(default_factory=dict)
    default_config: bool = False
    first_step_s: float | None = None

    @property
    def ranked_ms(self) -> float | None:
        return self.graph_median_ms if self.graph_median_ms is not None else self.median_ms


@dataclass
class TuneRun(Run):
    """A sweep: the benchmark's environment and copy bandwidth, the records, and per backend the configurations
    planned in order (``plan``), the default (``defaults``), and why it measured fewer than planned
    (``stopped``: the time limit, or that it cannot run here). ``estimate_s`` is the sweep's estimated length on
    an H100, ``elapsed_s`` what it took."""

    record_type: ClassVar[type[Record]] = TuneRecord

    plan: dict[str, list[dict[str, int]]] = field(default_factory=dict)
    defaults: dict[str, dict[str, int]] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)
    estimate_s: float | None = None


def grid(backend: str, module: ModuleType, device: torch.device, quick: bool) -> list[Any]:
    """The configurations to measure, the default first, then the others nearest to it first."""
    default = module.default_launch_config(device)
    if quick:
        candidates = [QUICK_ALTERNATIVES[backend]]
    else:
        axes = GRIDS[backend]
        candidates = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    configs = []
    for values in candidates:
        try:
            config = module.LaunchConfig(**values)
        except ValueError:  # e.g. a block larger than its chunk
            continue
        if PRUNE.get(backend, lambda _: True)(config) and config != default:
            configs.append(config)

    def distance(config: Any) -> float:
        return sum(
            abs(math.log2(a / b))
            for a, b in zip(dataclasses.astuple(config), dataclasses.astuple(default), strict=True)
        )

    return [default, *sorted(configs, key=distance)]  # sorted() is stable: grid order breaks ties


def specializations(pairs: Sequence[tuple[Case, Policy]]) -> int:
    """Kernel specializations the pairs compile: one per storage policy, and Triton specializes a tensor
    count of 1 apart."""
    return len({(policy.name, case.tensors == 1) for case, policy in pairs})


def estimate_s(backend: str, configs: int, pairs: Sequence[tuple[Case, Policy]]) -> float:
    """Estimated seconds of one backend's sweep on an H100 (see COMPILE_S)."""
    per_config = COMPILE_S[backend] * specializations(pairs)
    per_config += sum(GRAPH_S if launch_bound(case) else MEASURE_S for case, _ in pairs)
    return configs * per_config


def _record(backend: str, case: Case, policy: Policy, **fields: Any) -> TuneRecord:
    name, bytes_per_param = f"adam-gpu {backend}", policy.bytes_per_param()
    return TuneRecord(name, "adam-gpu", case.name, policy.name, case.numel, case.tensors, **fields,
                      backend=backend, bytes_per_param=bytes_per_param)  # fmt: skip


def _measure(
    record: TuneRecord,
    module: ModuleType,
    config: Any,
    optimizer: torch.optim.Optimizer,
    case: Case,
    device: torch.device,
    quick: bool,
) -> None:
    with module.launch_config(config), torch.no_grad():
        start = time.perf_counter()
        optimizer.step()  # Triton compiles this configuration here
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record.first_step_s = time.perf_counter() - start
        if graph_timed(case, device):
            # Only the replay is ranked: the eager time of a launch-bound step is the host's, which no
            # configuration changes (timing it too cost 0.25 s a case and configuration).
            record.graph_median_ms = timing.time_graph(optimizer.step, quick, REPEAT_MS).median_ms
            return
        measured = timing.time_device(optimizer.step, device, quick, REPEAT_MS)
        record.median_ms, record.p20_ms, record.p80_ms = measured.median_ms, measured.p20_ms, measured.p80_ms


def _fill_ratios(record: TuneRecord, copy_gbps: float) -> None:
    record.gbps = record.numel * record.bytes_per_param / (record.ranked_ms * 1e-3) / 1e9
    record.pct_copy = 100 * record.gbps / copy_gbps


@dataclass
class _Backend:
    """One backend's part of a sweep: its module, configurations, and the pairs it can run."""

    name: str
    contender: Contender
    module: ModuleType | None = None
    configs: list[Any] = field(default_factory=list)
    pairs: list[tuple[Case, Policy]] = field(default_factory=list)


def _prepare(
    name: str,
    device: torch.device,
    quick: bool,
    inputs: dict[tuple[Case, Policy], list[torch.Tensor] | str],
    run: TuneRun,
) -> _Backend:
    """The pairs ``name`` can run; a record saying why for each it cannot (dispatch's own reason)."""
    contender = next(c for c in contenders() if c.name == f"adam-gpu {name}")
    backend = _Backend(name, contender)
    for (case, policy), params in inputs.items():
        why_not = contender.unavailable(device, policy) or adam_gpu_unavailable(contender, device, policy)
        if why_not is None and isinstance(params, str):
            why_not = (UNSUPPORTED, f"does not fit: {params}")
        if why_not is None:
            backend.pairs.append((case, policy))
        else:
            run.records.append(_record(name, case, policy, status=why_not[0], reason=why_not[1]))
    if not backend.pairs:
        run.stopped[name] = "cannot run here: " + "; ".join(
            dict.fromkeys(r.reason for r in run.records if r.backend == name)
        )
        return backend
    backend.module = dispatch.BACKENDS[name].load()
    backend.configs = grid(name, backend.module, device, quick)
    run.plan[name] = [dataclasses.asdict(c) for c in backend.configs]
    run.defaults[name] = dataclasses.asdict(backend.configs[0])
    return backend


def _sweep_backend(
    backend: _Backend,
    inputs: dict[tuple[Case, Policy], list[torch.Tensor] | str],
    device: torch.device,
    quick: bool,
    deadline: float,
    run: TuneRun,
    progress: Callable[[str], None],
    checkpoint: Callable[[TuneRun], None],
) -> None:
    """Every configuration on every pair until ``deadline`` (time.monotonic()); the default is always measured."""
    optimizers = {}
    for case, policy in backend.pairs:
        try:
            optimizer = backend.contender.make(inputs[(case, policy)], policy, graph_timed(case, device))
            with torch.no_grad():
                optimizer.step()  # creates the state, in the default configuration: no config times an allocation
        except Exception as error:  # the pair is left out, its record says why
            run.records.append(_record(backend.name, case, policy, status=f"{ERROR}: {type(error).__name__}",
                                       reason=f"creating the state: {error}"))  # fmt: skip
            continue
        optimizers[(case, policy)] = optimizer
    for index, config in enumerate(backend.configs):
        if index and time.monotonic() >= deadline:
            run.stopped[backend.name] = f"time limit: {index} of {len(backend.configs)} configurations measured"
            break
        for (case, policy), optimizer in optimizers.items():
            progress(f"{backend.name} {config}: {case.name} {policy.name}")
            record = _record(backend.name, case, policy, config=dataclasses.asdict(config), default_config=index == 0)
            try:
                _measure(record, backend.module, config, optimizer, case, device, quick)
                _fill_ratios(record, run.copy_gbps)
            except Exception as error:  # one failing configuration must not end the sweep: its record says why
                record.status, record.reason = f"{ERROR}: {type(error).__name__}", str(error)
            run.records.append(record)
        checkpoint(run)
    del optimizers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep(
    device: torch.device,
    quick: bool,
    backends: Sequence[str] = BACKENDS,
    time_limit_s: float | None = None,
    progress: Callable[[str], None] = lambda description: None,
    checkpoint: Callable[[TuneRun], None] = lambda run: None,
    planned: Callable[[TuneRun], None] = lambda run: None,
) -> TuneRun:
    """Measure every configuration of each backend's grid on every pair of ``tune_plan(quick)``.

    With ``time_limit_s`` the backends share it in proportion to their estimates (time one leaves unused goes
    to the next), and each stops before a configuration that would start past its share; the default is always
    measured. ``planned`` gets the run once the grids are known (for a progress bar), ``progress`` is told
    before each measurement, ``checkpoint`` gets the run after each configuration."""
    started = time.monotonic()
    deadline = math.inf if time_limit_s is None else started + time_limit_s
    run = TuneRun(environment(device, quick), timing.copy_bandwidth_gbps(device, quick), time_limit_s=time_limit_s)
    inputs: dict[tuple[Case, Policy], list[torch.Tensor] | str] = {}
    for case, policy in tune_plan(quick):
        sets = input_sets(case, policy, device)
        inputs[(case, policy)] = sets if isinstance(sets, str) else sets[0]  # do_bench flushes L2 between steps
        del sets
    prepared = [_prepare(name, device, quick, inputs, run) for name in backends]
    estimates = [estimate_s(b.name, len(b.configs), b.pairs) for b in prepared]
    run.estimate_s = SETUP_S + sum(estimates)
    planned(run)
    for position, backend in enumerate(prepared):
        if backend.module is None:
            continue
        share = estimates[position] / sum(estimates[position:])
        now = time.monotonic()
        backend_deadline = math.inf if deadline == math.inf else now + share * max(0.0, deadline - now)
        _sweep_backend(backend, inputs, device, quick, backend_deadline, run, progress, checkpoint)
    run.elapsed_s = time.monotonic() - started
    checkpoint(run)
    return run
