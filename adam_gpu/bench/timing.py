"""How steps are timed: device time with CUDA events (``triton.testing.do_bench`` where Triton is
installed: median with 20th/80th percentiles, the L2 cache flushed before every step), CUDA-graph
replays beside eager steps, host time inside ``step()``, wall time on the CPU, and the copy bandwidth
every result is compared with."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Time budgets per measurement, in milliseconds (do_bench's warmup and rep).
WARMUP_MS = 25
REPEAT_MS = 100
QUICK_REPEAT_MS = 20
HOST_STEPS = 20  # step() calls whose CPU time is the host-time sample, at most
HOST_MIN_STEPS, HOST_MS = 5, 250  # ... and at least; more than HOST_MS spent ends the sample (see time_host)
MIN_SAMPLES = 5  # timed calls of a measurement however long each takes (without Triton and on the CPU)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantiles(samples_ms: list[float]) -> Timing:
    samples_ms = sorted(samples_ms)
    if len(samples_ms) == 1:
        return Timing(samples_ms[0], samples_ms[0], samples_ms[0])
    cuts = statistics.quantiles(samples_ms, n=10, method="inclusive")  # 10 %, 20 %, ..., 90 %
    return Timing(statistics.median(samples_ms), cuts[1], cuts[7])


def _repeat_ms(quick: bool, repeat_ms: float | None) -> float:
    return QUICK_REPEAT_MS if quick else REPEAT_MS if repeat_ms is None else repeat_ms


def time_device(
    function: Callable[[], object], device: torch.device, quick: bool = False, repeat_ms: float | None = None
) -> Timing:
    """Time ``function`` (one optimizer step): device time on CUDA, wall time on the CPU, over ``repeat_ms``
    milliseconds of calls (default REPEAT_MS; QUICK_REPEAT_MS when ``quick``)."""
    repeat_ms = _repeat_ms(quick, repeat_ms)
    if device.type == "cuda":
        return _time_cuda(function, repeat_ms)
    return _time_wall(function, repeat_ms)


def _time_cuda(function: Callable[[], object], repeat_ms: float) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(function, repeat_ms)
    median, p20, p80 = do_bench(function, warmup=WARMUP_MS, rep=repeat_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80)


def _time_cuda_events(function: Callable[[], object], repeat_ms: float) -> Timing:
    """do_bench's method without Triton: events around each call, a 256 MB write between calls so the
    L2 cache holds nothing of the step's data."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        function()
    torch.cuda.synchronize()
    samples, spent = [], 0.0
    while spent < repeat_ms or len(samples) < MIN_SAMPLES:
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
        spent += samples[-1]
    return _quantiles(samples)


def _time_wall(function: Callable[[], object], repeat_ms: float) -> Timing:
    function()  # warm-up
    samples, spent = [], 0.0
    while spent < repeat_ms or len(samples) < MIN_SAMPLES:
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1e3)
        spent += samples[-1]
    return _quantiles(samples)


def planned_steps(step_ms: float, quick: bool = False, repeat_ms: float | None = None) -> int:
    """About how many calls ``time_device`` and then ``time_host`` make of a step that takes ``step_ms``: a
    warm-up, the timed samples, the host-time samples (do_bench's own warm-up on a GPU is not counted)."""
    step_ms = max(step_ms, 1e-6)
    timed = max(MIN_SAMPLES, math.ceil(_repeat_ms(quick, repeat_ms) / step_ms))
    host = min(HOST_STEPS, max(HOST_MIN_STEPS, math.ceil(HOST_MS / step_ms)))
    return 1 + timed + host


def time_host(function: Callable[[], object], device: torch.device) -> float:
    """Median CPU time of one call, without waiting for the device: the launch overhead of ``step()``. Over
    HOST_STEPS calls, or fewer (HOST_MIN_STEPS at least) once HOST_MS is spent: slow baselines (torchao's
    8-bit AdamW took 92 ms a step) would otherwise hold the benchmark for seconds a case."""
    samples = []
    while len(samples) < HOST_STEPS and (len(samples) < HOST_MIN_STEPS or sum(samples) < HOST_MS):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(samples)


def time_graph(step: Callable[[], object], quick: bool = False, repeat_ms: float | None = None) -> Timing:
    """Capture one ``step()`` in a CUDA graph (after warm-up on a side stream, as capture requires) and
    time its replays: the step without Python and launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return _time_cuda(graph.replay, _repeat_ms(quick, repeat_ms))


def copy_bandwidth_gbps(device: torch.device, quick: bool = False) -> float:
    """The device's copy bandwidth in GB/s, bytes read + written, from a large device-to-device copy
    (1 GiB on a GPU, 256 MiB on the CPU)."""
    numel = (2**28 if device.type == "cuda" else 2**26) // (4 if quick else 1)
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    timing = time_device(lambda: target.copy_(source), device, quick)
    return 2 * source.numel() * source.element_size() / (timing.median_ms * 1e-3) / 1e9
