"""Where the host time of one ``FusedAdamW.step()`` goes: cProfile over the steps of one of the benchmark's
cases (a model's parameter list or a flat tensor), with the kernels launched for real on a GPU. On a CPU the
Triton kernel's compiled launcher is stubbed (host_overhead.py's stand-in driver; under Triton's interpreter, the
whole launch) and the cupy backend cannot run.

The benchmark reports host time per step beside device time; this says what it is made of. On the first H200
run, ResNet-50's 161 tensors took 1.08 ms of host time a step (torch fused: 0.49), where the same step with
the launch stubbed takes 0.35 ms on the CPU machine: the difference is on the GPU side of the host's work.

    python benchmarks/profile_step.py [--case resnet-50] [--backend triton] [--policy fp32] [--steps 50] [--top 20]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from adam_gpu import FusedAdamW
from adam_gpu.bench.cases import POLICIES, plan


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _launches_stubbed(device: torch.device, backend: str) -> contextlib.AbstractContextManager:
    """On a CPU, the Triton backend with only its compiled launcher stubbed (host_overhead.py's stand-in driver), or,
    where this process runs Triton's interpreter, its whole launch; elsewhere nothing changes."""
    if device.type != "cpu" or backend != "triton":
        return contextlib.nullcontext()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host_overhead import _launch_stubbed, stub_triton_driver

    from adam_gpu.backends import triton as triton_backend

    return _launch_stubbed() if triton_backend.runs_interpreted() else stub_triton_driver()


def profile(case_name: str, backend: str, policy_name: str, steps: int, top: int, device: torch.device) -> str:
    """The report: host milliseconds per step (median over ``steps``), then the ``top`` functions by own time
    and by cumulative time over another ``steps`` steps."""
    cases = {case.name: case for case, _ in plan(False, device.type)}
    if case_name not in cases:
        raise SystemExit(f"unknown case {case_name!r}: one of {', '.join(cases)}")
    case, policy = cases[case_name], POLICIES[policy_name]
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in case.shapes:
        param = torch.randn(shape, generator=generator, device=device, dtype=policy.param_dtype)
        param.grad = torch.randn(shape, generator=generator, device=device, dtype=policy.param_dtype)
        params.append(param)
    optimizer = FusedAdamW(params, lr=1e-3, weight_decay=0.01, backend=backend, state_dtype=policy.state_dtype,
                           master_weights=policy.master_weights)  # fmt: skip
    with _launches_stubbed(device, backend), torch.no_grad():
        for _ in range(3):  # state, compiled kernels, tables
            optimizer.step()
        _synchronize(device)
        times, thread_times = [], []
        collections = sum(generation["collections"] for generation in gc.get_stats())
        for _ in range(steps):
            start, thread_start = time.perf_counter(), time.thread_time()
            optimizer.step()
            times.append((time.perf_counter() - start) * 1e3)
            thread_times.append((time.thread_time() - thread_start) * 1e3)
        collections = sum(generation["collections"] for generation in gc.get_stats()) - collections
        _synchronize(device)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            optimizer.step()
        profiler.disable()
        _synchronize(device)
        # What the steps call below Python (aten ops, and on a GPU the CUDA runtime: launches, copies, syncs).
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as below_python:
            for _ in range(min(steps, 20)):
                optimizer.step()
            _synchronize(device)
    out = io.StringIO()
    what = f"{case.name} ({case.tensors} tensors, {case.numel:,} elements), {policy.name}"
    where = f"backend {optimizer.selected_backends[0]}, {device}"
    # Wall time against the thread's CPU time: where they differ, the step waited (a lock, the driver, a sync).
    out.write(
        f"{what}, {where}: host {statistics.median(times):.3f} ms a step (median of {steps}; the thread's CPU "
        f"time {statistics.median(thread_times):.3f} ms; {collections} garbage collections in those steps)\n"
    )
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(top)
    out.write(f"torch.profiler over {min(steps, 20)} steps, by self CPU time:\n")
    out.write(below_python.key_averages().table(sort_by="self_cpu_time_total", row_limit=top) + "\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="resnet-50", help="a case of adam-gpu bench (default resnet-50)")
    parser.add_argument("--backend", default="triton", help="triton, cupy, torch or auto")
    parser.add_argument("--policy", default="fp32", choices=sorted(POLICIES))
    parser.add_argument("--steps", type=int, default=50, help="steps timed, then as many profiled")
    parser.add_argument("--top", type=int, default=20, help="functions listed in each order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    report = profile(args.case, args.backend, args.policy, args.steps, args.top, torch.device(args.device))
    print(report)
    return report


if __name__ == "__main__":
    import os

    os.environ.setdefault("TRITON_INTERPRET", "0")  # (on a CPU: the kernel compiled for the stand-in driver)
    main()
