"""Host time of one ``step()``: the Python work adam-gpu does around its single launch, on any machine.

On a GPU the launch is asynchronous, so an optimizer step costs the device its memory traffic and the host
its Python: checks, state, the tensor table, step counts, Triton's own per-call work. With many small tensors the
host part decides eager step time. This measures it without a GPU, stubbing only the lowest call: Triton compiles
the kernel for an sm_90 target (no GPU needed) and a stand-in driver (``stub_triton_driver``) loads it without a
device and gives it a launcher that does nothing, so everything above the compiled launcher is timed (in a child
process where this one runs Triton's interpreter). The CuPy backend is timed the same way with the driver's launch
(``cuLaunchKernel``) a no-op and its specialization taken as loaded (``stub_cupy_launch``): its argument packing is
timed, not the compile. The baselines are torch.optim.AdamW's fused, foreach and for-loop
implementations on 1-element CPU tensors (their arithmetic is then negligible beside their host work), measured in
the same run. Each is timed twice: with the same grad tensors every step, and with new ones every step, as after
``zero_grad()`` (set_to_none, torch's default) and backward: there grads are swapped in, outside the timing,
from GRAD_SETS sets (more than the tables adam-gpu keeps per launch for other grads, so the worst case).
Reported: milliseconds of the thread's CPU time per step and microseconds per tensor (median of --repeat
timings), and each row's ratio to torch fused. With ``--compiled``, adam-gpu's and torch's fused step are also timed
as ``torch.compile(optimizer.step)`` (inductor, compiled before the timing): dynamo's guards and the graph's call
replace the eager Python around the launch.

    python benchmarks/host_overhead.py [--tensors 1 161 1000] [--repeat 30] [--quick] [--compiled]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.table import Table

from adam_gpu import FusedAdamW, native_guards
from adam_gpu.backends import triton as triton_backend
from adam_gpu.device_inputs import unused_values

ADAM_GPU = "adam-gpu FusedAdamW (launcher stubbed)"
CUPY = "adam-gpu FusedAdamW, cupy (driver launch stubbed)"
NATIVE = "adam-gpu, compiled proof (ADAM_GPU_NATIVE_GUARDS=1)"
COMPILED = "{}, torch.compile"


class _NoLaunch:
    """Stands in for the Triton kernel: ``kernel[grid](...)`` does nothing (benchmarks/profile_step.py's stub,
    where the kernel runs under Triton's interpreter)."""

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _no_launch(*args: object) -> None:
    """The stand-in driver's launcher: takes the grid, stream, kernel and arguments a CUDA launch would."""


class StubCudaDriver:
    """A Triton driver on a machine without a GPU: an sm_90 target, kernels loaded without a device (no module,
    function handle 1), and a launcher that does nothing. Triton's compiler runs as for a GPU."""

    def __init__(self) -> None:
        properties = {"max_shared_mem": 227 * 1024, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}
        self.utils = SimpleNamespace(
            load_binary=lambda name, kernel, shared, device: (None, 1, 0, 0, 1024),
            get_device_properties=lambda device: properties,
        )
        self.launcher_cls = lambda source, metadata: _no_launch

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return (9, 0)

    def get_current_target(self) -> object:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self) -> object:
        return torch.cuda


@contextlib.contextmanager
def stub_triton_driver() -> Iterator[StubCudaDriver]:
    """Triton's active driver is a StubCudaDriver inside the block (the kernel module must be imported compiled,
    TRITON_INTERPRET unset or 0), and the Triton backend takes CPU tensors; both restored after."""
    from triton.runtime.driver import driver

    if triton_backend.runs_interpreted():
        raise RuntimeError("the kernel module runs under Triton's interpreter here: run with TRITON_INTERPRET=0")
    stub, saved = StubCudaDriver(), (driver._active, triton_backend.runs_interpreted)
    driver.set_active(stub)
    triton_backend.runs_interpreted = lambda: True  # (the backend's check that CPU tensors can be launched)
    try:
        yield stub
    finally:
        driver._active, triton_backend.runs_interpreted = saved


@contextlib.contextmanager
def stub_cupy_launch() -> Iterator[None]:
    """The CuPy backend on CPU tensors inside the block: every specialization taken as loaded (function handle 1),
    the driver's launch a no-op, torch's current CUDA device and stream stand-ins; all restored after."""
    from adam_gpu.backends import cupy as cupy_backend

    class Loaded:
        ptr = 1

    stream = SimpleNamespace(cuda_stream=0)
    replaced = {
        (cupy_backend, "unavailable_reason"): lambda device, dtype: None,
        (cupy_backend, "_function"): lambda device_index, name_expression: Loaded,
        (cupy_backend, "launch_kernel"): lambda *arguments: None,
        (cupy_backend, "cuda_runtime"): SimpleNamespace(memGetInfo=lambda: (0, 0)),
        (cupy_backend, "unused_values"): lambda device: unused_values(torch.device("cpu")),
        (cupy_backend, "_multiprocessors"): lambda device_index: 132,
        (torch.cuda, "current_stream"): lambda device=None: stream,
        (torch.cuda, "current_device"): lambda: 0,
    }
    saved = {key: getattr(*key) for key in replaced}
    for (owner, name), value in replaced.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


# Grad sets the "new each step" timing cycles through (tensor_table keeps tables for 4 other sets per launch).
GRAD_SETS = 8


def _median_ms(step: Callable[[], object], repeat: int, before: Callable[[], object] = lambda: None) -> float:
    """Median milliseconds of ``step()``, each call preceded by ``before()`` (not timed)."""
    before()
    step()  # state, tables and caches are built outside the timing
    times = []
    for _ in range(repeat):
        before()
        start = time.thread_time()  # (this thread's CPU time: other processes on the cores do not count)
        step()
        times.append((time.thread_time() - start) * 1e3)
    return statistics.median(times)


def _params(count: int, numel: int) -> list[torch.Tensor]:
    params = [torch.randn(numel, requires_grad=True) for _ in range(count)]
    for param in params:
        param.grad = torch.randn_like(param)
    return params


def _new_grads(params: list[torch.Tensor]) -> Callable[[], None]:
    """Gives ``params`` the next of GRAD_SETS sets of grad tensors at each call."""
    sets = [[torch.randn_like(p) for p in params] for _ in range(GRAD_SETS)]
    turn = iter(range(2**62))

    def swap() -> None:
        for param, grad in zip(params, sets[next(turn) % GRAD_SETS], strict=True):
            param.grad = grad

    return swap


@contextlib.contextmanager
def _launch_stubbed() -> Iterator[None]:
    """The Triton backend with its kernel replaced by ``_NoLaunch`` (and available on CPU tensors), restored after:
    for a process whose kernel runs under the interpreter (Triton's per-call work is then not timed)."""
    kernels = triton_backend._kernels()
    saved = kernels.adam_step_kernel, triton_backend.runs_interpreted
    kernels.adam_step_kernel, triton_backend.runs_interpreted = _NoLaunch(), lambda: True
    try:
        yield
    finally:
        kernels.adam_step_kernel, triton_backend.runs_interpreted = saved


def measure(counts: list[int], repeat: int, compiled: bool = False) -> list[dict[str, object]]:
    """One row per (tensor count, optimizer, grads kept or new): ms per step and us per tensor; measured in a
    child process where this one runs Triton's interpreter."""
    if triton_backend.runs_interpreted():
        command = [sys.executable, __file__, "--rows-json", "--repeat", str(repeat), "--tensors", *map(str, counts)]
        command += ["--compiled"] if compiled else []
        environment = {**os.environ, "TRITON_INTERPRET": "0"}
        done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"the measuring process failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.splitlines()[-1])
    with stub_triton_driver():
        return [row for count in counts for row in _measure(count, repeat, compiled)]


def _compiled_step(optimizer: torch.optim.Optimizer) -> Callable[[], object]:
    """``optimizer.step`` compiled: in one graph for adam-gpu; torch.optim breaks its own step's graph on purpose
    (``_use_grad``: so that AOT sees a no-grad graph), so it is compiled without ``fullgraph``."""
    torch._dynamo.reset()  # (each contender's graphs alone in dynamo's cache)
    return torch.compile(optimizer.step, fullgraph=isinstance(optimizer, FusedAdamW))


def _native_buildable() -> bool:
    """Whether adam_gpu.native_guards' compiled proof builds here (built once, then cached by torch)."""
    with _native_proof_asked():
        return native_guards.snapshot_type() is not None


@contextlib.contextmanager
def _native_proof_asked() -> Iterator[None]:
    saved = os.environ.get(native_guards.ENV_VAR)
    os.environ[native_guards.ENV_VAR] = "1"
    native_guards.snapshot_type.cache_clear()
    try:
        yield
    finally:
        os.environ.pop(native_guards.ENV_VAR)
        if saved is not None:
            os.environ[native_guards.ENV_VAR] = saved
        native_guards.snapshot_type.cache_clear()


def _with_native_proof(optimizer: FusedAdamW) -> Callable[[], object]:
    """The optimizer's step, its reused steps proven by the compiled snapshot (made at its first, full step)."""
    with _native_proof_asked():
        optimizer.step()
    return optimizer.step


def _measure(count: int, repeat: int, compiled: bool = False) -> list[dict[str, object]]:
    contenders = {
        ADAM_GPU: lambda params: FusedAdamW(params, lr=1e-3, backend="triton").step,
        CUPY: lambda params: FusedAdamW(params, lr=1e-3, backend="cupy").step,
        "torch AdamW fused": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True).step,
        "torch AdamW foreach": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True).step,
        "torch AdamW for-loop": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=False).step,
    }
    if _native_buildable():
        contenders[NATIVE] = lambda params: _with_native_proof(FusedAdamW(params, lr=1e-3, backend="triton"))
    if compiled:
        contenders[COMPILED.format(ADAM_GPU)] = lambda params: _compiled_step(FusedAdamW(params, backend="triton"))
        contenders[COMPILED.format("torch AdamW fused")] = lambda params: _compiled_step(
            torch.optim.AdamW(params, lr=1e-3, fused=True)
        )
    rows = []
    for grads in ("kept", "new each step"):
        for name, make in contenders.items():
            params = _params(count, 1)
            swap = _new_grads(params) if grads == "new each step" else lambda: None
            with stub_cupy_launch() if name == CUPY else contextlib.nullcontext():
                ms = _median_ms(make(params), repeat, swap)
            row = {"tensors": count, "grads": grads, "optimizer": name, "ms": ms, "us_per_tensor": ms * 1e3 / count}
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[1, 161, 1000], help="tensors per group")
    parser.add_argument("--repeat", type=int, default=30, help="timed steps per optimizer (median)")
    parser.add_argument("--quick", action="store_true", help="10 tensors, 3 steps: checks the script")
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile'd steps (inductor)")
    parser.add_argument("--rows-json", action="store_true", help=argparse.SUPPRESS)  # (the measuring child process)
    args = parser.parse_args(argv)
    counts, repeat = ([10], 3) if args.quick else (args.tensors, args.repeat)
    rows = measure(counts, repeat, args.compiled)
    if args.rows_json:
        print(json.dumps(rows))
        return rows
    title = "Host time of one step() (CPU; adam-gpu's compiled launcher stubbed, torch on 1-element tensors)"
    table = Table(title=title)
    numbers = ("tensors", "ms / step", "us / tensor", "x torch fused")
    for column in ("tensors", "grads", "optimizer", *numbers[1:]):
        table.add_column(column, justify="right" if column in numbers else "left")
    fused = {(row["tensors"], row["grads"]): row["ms"] for row in rows if row["optimizer"] == "torch AdamW fused"}
    for row in rows:
        cells = (str(row["tensors"]), str(row["grads"]), str(row["optimizer"]))
        ratio = row["ms"] / fused[row["tensors"], row["grads"]]
        table.add_row(*cells, f"{row['ms']:.3f}", f"{row['us_per_tensor']:.1f}", f"{ratio:.2f}")
    Console(width=120).print(table)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")  # (read when the kernel module is imported, at the first step)
    main()
