"""The benchmark loop: for every (case, policy), every contender steps the same random params and grads;
one Record per contender, speed-ups against torch's fused and foreach AdamW measured in the same run."""

from __future__ import annotations

import datetime
import gc
import math
import platform
import time
from collections.abc import Callable, Collection

import torch

from adam_gpu import __version__
from adam_gpu.bench import memory, timing
from adam_gpu.bench.cases import Case, Policy, plan
from adam_gpu.bench.contenders import Contender, adam_gpu_unavailable, contenders
from adam_gpu.bench.records import ERROR, GRAPH_FAILED, NOT_INSTALLED, OK, TOO_SLOW, UNSUPPORTED, Record, Run
from adam_gpu.versions import package_version

# Input sets rotated from step to step so that, together, they overflow the L2 cache (50 MB on H100).
ROTATION_BYTES = 256 * 2**20
MAX_INPUT_SETS = 8
# Fraction of free memory (the device's; the host's on the CPU) one case may take: params, grads and moments of
# every input set, twice over for torch foreach's temporaries (about one more moment) and a captured optimizer's
# own state.
# (Llama-3.2-1B in fp32 holds 20 GB a set: 40 GB with the margin fits an 80 GB H100.)
MEMORY_SHARE = 0.8
# Cases with this many elements or fewer, or with several tensors, are launch-bound: also timed as CUDA graphs.
LAUNCH_BOUND_NUMEL = 2**22


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, quick: bool, plan_name: str | None = None) -> dict[str, object]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            driver = str(torch._C._cuda_getDriverVersion())
        except (AttributeError, RuntimeError):
            driver = "unknown"
    else:
        name, driver = _cpu_name(), "none"
    return {
        "device": name,
        "device_type": device.type,
        "driver": driver,
        "adam_gpu": __version__,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cupy": package_version("cupy"),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "quick": quick,
        "plan": plan_name,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


def launch_bound(case: Case) -> bool:
    """Also timed as CUDA-graph replays (several tensors, or a small one): the eager time of such a step is
    mostly the host's."""
    return case.tensors > 1 or case.numel <= LAUNCH_BOUND_NUMEL


def set_bytes(case: Case, policy: Policy) -> float:
    """What one input set holds (not what a step moves: the moments are read and written but stored once)."""
    return case.numel * policy.resident_bytes_per_param()


def input_sets(
    case: Case, policy: Policy, device: torch.device, free_bytes: Callable[[torch.device], int] = memory.free_bytes
) -> list[list[torch.Tensor]] | str:
    """Random params with random grads (never zeros), as many sets as the L2 rotation wants and memory
    allows; or why the case does not fit (in MEMORY_SHARE of ``free_bytes(device)``)."""
    per_set = set_bytes(case, policy)
    budget = MEMORY_SHARE * free_bytes(device)
    if per_set * 2 > budget:  # foreach's temporaries can double a set
        return f"needs {2 * per_set / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB available"
    count = max(1, min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / per_set), int(budget // (2 * per_set))))
    generator = torch.Generator(device=device).manual_seed(0)
    sets = []
    for _ in range(count):
        params = []
        for shape in case.shapes:
            param = torch.randn(shape, generator=generator, device=device, dtype=policy.param_dtype)
            param.grad = torch.randn(shape, generator=generator, device=device, dtype=policy.param_dtype)
            params.append(param)
        sets.append(params)
    return sets


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a state tensor holds. A tensor subclass that wraps others (torchao's 8-bit state: uint8 codes and
    fp32 scales presented as an fp32 tensor) holds its inner tensors, which ``__tensor_flatten__`` names."""
    if hasattr(type(tensor), "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def state_bytes_per_param(optimizer: torch.optim.Optimizer, numel: int) -> float:
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                total += stored_bytes(value)
    return total / numel


class TooSlow(Exception):
    """The first step said the whole measurement would run past the case time limit."""


def _measure(
    contender: Contender,
    sets: list[list[torch.Tensor]],
    case: Case,
    policy: Policy,
    device: torch.device,
    quick: bool,
    case_time_limit_s: float | None = None,
) -> Record:
    record = Record(contender.name, contender.family, case.name, policy.name, case.numel, case.tensors)
    with torch.no_grad():
        optimizers = [contender.make(params, policy, False) for params in sets]
        _time_eager(record, optimizers, device, quick, case_time_limit_s)
        if device.type == "cuda" and launch_bound(case) and contender.graphable:
            try:
                graphed = contender.make(sets[0], policy, True)
                graphed.step()
                record.graph_median_ms = timing.time_graph(graphed.step, quick).median_ms
            except Exception as error:  # the eager numbers stand; the record says why the graph has none
                record.reason = f"{GRAPH_FAILED}: {type(error).__name__}: {error}"
    record.bytes_per_param = policy.bytes_per_param()
    return record


def _first_step_s(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    started = time.perf_counter()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def check_time(first_step_s: float, sets: int, quick: bool, case_time_limit_s: float | None) -> None:
    """Raise TooSlow where a measurement whose first step took ``first_step_s`` would run past the limit: one
    first step per input set, then the steps timing.planned_steps counts."""
    if case_time_limit_s is None:
        return
    steps = sets - 1 + timing.planned_steps(first_step_s * 1e3, quick)
    if first_step_s * steps > case_time_limit_s:
        raise TooSlow(
            f"first step {first_step_s:.2f} s: {steps} more would take about {first_step_s * steps:.0f} s, over "
            f"the case time limit ({case_time_limit_s:.0f} s)"
        )


def _time_eager(
    record: Record,
    optimizers: list[torch.optim.Optimizer],
    device: torch.device,
    quick: bool,
    case_time_limit_s: float | None = None,
) -> None:
    """Device and host time of ``step()``, rotating over one optimizer per input set."""
    # The first step of each creates the state (the timed steps never see zero moments); the first one's time
    # says whether the rest fits the case time limit.
    check_time(_first_step_s(optimizers[0], device), len(optimizers), quick, case_time_limit_s)
    for optimizer in optimizers[1:]:
        optimizer.step()
    turn = iter(range(2**62))

    def step() -> None:
        optimizers[next(turn) % len(optimizers)].step()

    measured = timing.time_device(step, device, quick)
    record.median_ms, record.p20_ms, record.p80_ms = measured.median_ms, measured.p20_ms, measured.p80_ms
    record.host_ms = timing.time_host(step, device)
    record.state_bytes_per_param = state_bytes_per_param(optimizers[0], record.numel)


def copy_comparable(device: torch.device, sets: int, per_set: float) -> bool:
    """Whether a step's GB/s may be read as a share of the copy bandwidth: on a GPU where the rotated input
    sets together overflow the L2 cache (ROTATION_BYTES), as the copy's do. Never on the CPU: its caches hold
    the small cases whole, and its step is not bound by the memory the copy measures (benchmarks/README.md)."""
    return device.type == "cuda" and sets * per_set >= ROTATION_BYTES


def _fill_ratios(records: list[Record], copy_gbps: float | None) -> None:
    """GB/s and speed-ups of each measured record; % of copy bandwidth where ``copy_gbps`` is given."""
    medians = {r.contender: r.median_ms for r in records if r.status == OK}
    for record in records:
        if record.status != OK:
            continue
        record.gbps = record.numel * record.bytes_per_param / (record.median_ms * 1e-3) / 1e9
        if copy_gbps:
            record.pct_copy = 100 * record.gbps / copy_gbps
        if medians.get("torch fused"):
            record.speedup_vs_torch_fused = medians["torch fused"] / record.median_ms
        if medians.get("torch foreach"):
            record.speedup_vs_torch_foreach = medians["torch foreach"] / record.median_ms


def _skipped(contender: Contender, case: Case, policy: Policy, status: str, reason: str) -> Record:
    return Record(contender.name, contender.family, case.name, policy.name, case.numel, case.tensors, status, reason)


def pair_line(position: int, total: int, elapsed_s: float, records: list[Record], seconds: float) -> str:
    """One log line for a finished (case, policy): what was measured, what was too slow or failed, how long."""
    first = records[0]
    measured = [r for r in records if r.status == OK]
    parts = [f"{len(measured)} measured"]
    noisy = [r.contender for r in measured if r.wide]
    if noisy:
        parts.append(f"wide spread: {', '.join(noisy)}")
    slow = [r.contender for r in records if r.status == TOO_SLOW]
    if slow:
        parts.append(f"too slow: {', '.join(slow)}")
    failed = [r.contender for r in records if r.status not in (OK, TOO_SLOW, NOT_INSTALLED, UNSUPPORTED)]
    if failed:
        parts.append(f"failed: {', '.join(failed)}")
    width = len(str(total))
    return (
        f"[{position:>{width}}/{total} {elapsed_s:4.0f} s] {first.case}, {first.policy}: {'; '.join(parts)} "
        f"({seconds:.1f} s)"
    )


def _why_not(contender: Contender, device: torch.device, policy: Policy, sets: object) -> tuple[str, str] | None:
    why_not = contender.unavailable(device, policy) or adam_gpu_unavailable(contender, device, policy)
    if why_not is None and device.type == "cpu" and contender.family == "adam-gpu":
        if contender.name != "adam-gpu torch":
            why_not = (UNSUPPORTED, "a GPU kernel: not measured on the CPU")
    if why_not is None and isinstance(sets, str):
        why_not = (UNSUPPORTED, f"does not fit: {sets}")
    return why_not


def benchmark(
    device: torch.device,
    quick: bool,
    progress: Callable[[str], None] = lambda description: None,
    checkpoint: Callable[[Run], None] = lambda run: None,
    time_limit_s: float | None = None,
    only: Collection[str] | None = None,
    policies: Collection[str] | None = None,
    full: bool = False,
    case_time_limit_s: float | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Run:
    """Measure every contender on every (case, policy) of the plan. ``progress`` is told before each
    measurement; ``log`` gets a line after each (case, policy) (pair_line); ``checkpoint`` gets the run so far
    after each, so that a run killed from outside keeps what it measured. With ``time_limit_s`` no (case,
    policy) starts after that many seconds but the first (the plan puts the headline cases first); those left
    are listed in ``run.not_measured``. With ``case_time_limit_s`` a contender whose first step says its
    measurement would take longer is recorded TOO_SLOW. ``only``, ``policies``, ``full``: which pairs
    (cases.plan)."""
    started = time.monotonic()
    pairs = plan(quick, device.type, only, policies, full)
    plan_name = "quick" if quick else "full" if full or only is not None or device.type == "cuda" else "default"
    run = Run(
        environment(device, quick, plan_name),
        timing.copy_bandwidth_gbps(device, quick),
        time_limit_s=time_limit_s,
        case_time_limit_s=case_time_limit_s,
    )
    for position, (case, policy) in enumerate(pairs):
        if position and time_limit_s is not None and time.monotonic() - started > time_limit_s:
            run.not_measured = [f"{case.name}, {policy.name}" for case, policy in pairs[position:]]
            break
        pair_started = time.monotonic()
        sets = input_sets(case, policy, device)
        records = []
        for contender in contenders():
            progress(f"{case.name} {policy.name}: {contender.name}")
            why_not = _why_not(contender, device, policy, sets)
            if why_not is not None:
                records.append(_skipped(contender, case, policy, *why_not))
                continue
            try:
                measuring = time.monotonic()
                records.append(_measure(contender, sets, case, policy, device, quick, case_time_limit_s))
                records[-1].seconds = time.monotonic() - measuring
            except TooSlow as slow:
                records.append(_skipped(contender, case, policy, TOO_SLOW, str(slow)))
            except Exception as error:  # one failing contender must not end the run: its record says why
                records.append(_skipped(contender, case, policy, f"{ERROR}: {type(error).__name__}", str(error)))
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        comparable = not isinstance(sets, str) and copy_comparable(device, len(sets), set_bytes(case, policy))
        _fill_ratios(records, run.copy_gbps if comparable else None)
        run.records += records
        del sets
        checkpoint(run)
        now = time.monotonic()
        log(pair_line(position + 1, len(pairs), now - started, records, now - pair_started))
    run.elapsed_s = time.monotonic() - started
    return run
