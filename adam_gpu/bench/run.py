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
from adam_gpu.bench import timing
from adam_gpu.bench.cases import Case, Policy, plan
from adam_gpu.bench.contenders import Contender, adam_gpu_unavailable, contenders
from adam_gpu.bench.records import ERROR, GRAPH_FAILED, OK, Record, Run
from adam_gpu.versions import package_version

# Input sets rotated from step to step so that, together, they overflow the L2 cache (50 MB on H100).
ROTATION_BYTES = 256 * 2**20
MAX_INPUT_SETS = 8
# Fraction of free device memory one case may take: params, grads and moments of every input set, twice
# over for torch foreach's temporaries (about one more moment) and a captured optimizer's own state.
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


def environment(device: torch.device, quick: bool) -> dict[str, object]:
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
    }


def launch_bound(case: Case) -> bool:
    """Also timed as CUDA-graph replays (several tensors, or a small one): the eager time of such a step is
    mostly the host's."""
    return case.tensors > 1 or case.numel <= LAUNCH_BOUND_NUMEL


def input_sets(case: Case, policy: Policy, device: torch.device) -> list[list[torch.Tensor]] | str:
    """Random params with random grads (never zeros), as many sets as the L2 rotation wants and memory
    allows; or why the case does not fit."""
    # What a set holds (not what a step moves: the moments are read and written but stored once).
    per_set = case.numel * policy.resident_bytes_per_param()
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # the last case's sets, freed but cached by torch, count as used otherwise
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = 8 * 2**30
    budget = MEMORY_SHARE * free
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


def _measure(
    contender: Contender, sets: list[list[torch.Tensor]], case: Case, policy: Policy, device: torch.device, quick: bool
) -> Record:
    record = Record(contender.name, contender.family, case.name, policy.name, case.numel, case.tensors)
    with torch.no_grad():
        _time_eager(record, [contender.make(params, policy, False) for params in sets], device, quick)
        if device.type == "cuda" and launch_bound(case) and contender.graphable:
            try:
                graphed = contender.make(sets[0], policy, True)
                graphed.step()
                record.graph_median_ms = timing.time_graph(graphed.step, quick).median_ms
            except Exception as error:  # the eager numbers stand; the record says why the graph has none
                record.reason = f"{GRAPH_FAILED}: {type(error).__name__}: {error}"
    record.bytes_per_param = policy.bytes_per_param()
    return record


def _time_eager(record: Record, optimizers: list[torch.optim.Optimizer], device: torch.device, quick: bool) -> None:
    """Device and host time of ``step()``, rotating over one optimizer per input set."""
    for optimizer in optimizers:
        optimizer.step()  # creates the state: the timed steps never see zero moments
    turn = iter(range(2**62))

    def step() -> None:
        optimizers[next(turn) % len(optimizers)].step()

    measured = timing.time_device(step, device, quick)
    record.median_ms, record.p20_ms, record.p80_ms = measured.median_ms, measured.p20_ms, measured.p80_ms
    record.host_ms = timing.time_host(step, device)
    record.state_bytes_per_param = state_bytes_per_param(optimizers[0], record.numel)


def _fill_ratios(records: list[Record], copy_gbps: float) -> None:
    medians = {r.contender: r.median_ms for r in records if r.status == OK}
    for record in records:
        if record.status != OK:
            continue
        record.gbps = record.numel * record.bytes_per_param / (record.median_ms * 1e-3) / 1e9
        record.pct_copy = 100 * record.gbps / copy_gbps
        if medians.get("torch fused"):
            record.speedup_vs_torch_fused = medians["torch fused"] / record.median_ms
        if medians.get("torch foreach"):
            record.speedup_vs_torch_foreach = medians["torch foreach"] / record.median_ms


def _skipped(contender: Contender, case: Case, policy: Policy, status: str, reason: str) -> Record:
    return Record(contender.name, contender.family, case.name, policy.name, case.numel, case.tensors, status, reason)


def benchmark(
    device: torch.device,
    quick: bool,
    progress: Callable[[str], None] = lambda description: None,
    checkpoint: Callable[[Run], None] = lambda run: None,
    time_limit_s: float | None = None,
    only: Collection[str] | None = None,
    policies: Collection[str] | None = None,
) -> Run:
    """Measure every contender on every (case, policy) of the plan. ``progress`` is told before each
    measurement; ``checkpoint`` gets the run so far after each (case, policy), so that a run killed
    from outside keeps what it measured. With ``time_limit_s`` no (case, policy) starts after that many
    seconds but the first (the plan puts the headline cases first); those left are listed in
    ``run.not_measured``. ``only``, ``policies``: the plan's pairs of these cases, these policies alone (cases.plan)."""
    started = time.monotonic()
    run = Run(environment(device, quick), timing.copy_bandwidth_gbps(device, quick), time_limit_s=time_limit_s)
    pairs = plan(quick, device.type, only, policies)
    for position, (case, policy) in enumerate(pairs):
        if position and time_limit_s is not None and time.monotonic() - started > time_limit_s:
            run.not_measured = [f"{case.name}, {policy.name}" for case, policy in pairs[position:]]
            break
        sets = input_sets(case, policy, device)
        records = []
        for contender in contenders():
            progress(f"{case.name} {policy.name}: {contender.name}")
            why_not = contender.unavailable(device, policy) or adam_gpu_unavailable(contender, device, policy)
            if why_not is None and device.type == "cpu" and contender.family == "adam-gpu":
                if contender.name != "adam-gpu torch":
                    why_not = ("unsupported", "a GPU kernel: not measured on the CPU")
            if why_not is None and isinstance(sets, str):
                why_not = ("unsupported", f"does not fit: {sets}")
            if why_not is not None:
                records.append(_skipped(contender, case, policy, *why_not))
                continue
            try:
                measuring = time.monotonic()
                records.append(_measure(contender, sets, case, policy, device, quick))
                records[-1].seconds = time.monotonic() - measuring
            except Exception as error:  # one failing contender must not end the run: its record says why
                records.append(_skipped(contender, case, policy, f"{ERROR}: {type(error).__name__}", str(error)))
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        _fill_ratios(records, run.copy_gbps)
        run.records += records
        del sets
        checkpoint(run)
    run.elapsed_s = time.monotonic() - started
    return run
