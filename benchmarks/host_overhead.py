"""Host time of one ``step()``: the Python work adam-gpu does around its single launch, on any machine.

On a GPU the launch is asynchronous, so an optimizer step costs the device its memory traffic and the host
its Python: checks, state, the tensor table, step counts. With many small tensors the host part decides
eager step time. This measures it without a GPU: the Triton kernel's launch is replaced by a no-op (the
kernels are not run), and the baselines are torch.optim.AdamW's fused, foreach and for-loop implementations
on 1-element CPU tensors (their arithmetic is then negligible beside their host work), measured in the same
run. Each is timed twice: with the same grad tensors every step, and with new ones every step, as after
``zero_grad()`` (set_to_none, torch's default) and backward: there grads are swapped in, outside the timing,
from GRAD_SETS sets (more than the tables adam-gpu keeps per launch for other grads, so the worst case).
Reported: milliseconds per step and microseconds per tensor (median of --repeat timings).

    python benchmarks/host_overhead.py [--tensors 148 1000] [--repeat 30] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from rich.console import Console
from rich.table import Table

from adam_gpu import FusedAdamW
from adam_gpu.backends import triton as triton_backend


class _NoLaunch:
    """Stands in for the Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: None


# Grad sets the "new each step" timing cycles through (tensor_table keeps tables for 4 other sets per launch).
GRAD_SETS = 8


def _median_ms(step: Callable[[], object], repeat: int, before: Callable[[], object] = lambda: None) -> float:
    """Median milliseconds of ``step()``, each call preceded by ``before()`` (not timed)."""
    before()
    step()  # state, tables and caches are built outside the timing
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
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
    """The Triton backend with its kernel replaced by ``_NoLaunch`` (and available on CPU tensors), restored after."""
    kernels = triton_backend._kernels()
    saved = kernels.adam_step_kernel, triton_backend.runs_interpreted
    kernels.adam_step_kernel, triton_backend.runs_interpreted = _NoLaunch(), lambda: True
    try:
        yield
    finally:
        kernels.adam_step_kernel, triton_backend.runs_interpreted = saved


def measure(counts: list[int], repeat: int) -> list[dict[str, object]]:
    """One row per (tensor count, optimizer, grads kept or new): ms per step and us per tensor."""
    with _launch_stubbed():
        return [row for count in counts for row in _measure(count, repeat)]


def _measure(count: int, repeat: int) -> list[dict[str, object]]:
    contenders = {
        "adam-gpu FusedAdamW (launch stubbed)": lambda params: FusedAdamW(params, lr=1e-3, backend="triton"),
        "torch AdamW fused": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
        "torch AdamW foreach": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True),
        "torch AdamW for-loop": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=False),
    }
    rows = []
    for grads in ("kept", "new each step"):
        for name, make in contenders.items():
            params = _params(count, 1)
            swap = _new_grads(params) if grads == "new each step" else lambda: None
            ms = _median_ms(make(params).step, repeat, swap)
            row = {"tensors": count, "grads": grads, "optimizer": name, "ms": ms, "us_per_tensor": ms * 1e3 / count}
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[148, 1000], help="tensors per group")
    parser.add_argument("--repeat", type=int, default=30, help="timed steps per optimizer (median)")
    parser.add_argument("--quick", action="store_true", help="10 tensors, 3 steps: checks the script")
    args = parser.parse_args(argv)
    counts, repeat = ([10], 3) if args.quick else (args.tensors, args.repeat)
    rows = measure(counts, repeat)
    table = Table(title="Host time of one step() (CPU; adam-gpu's kernel launch stubbed, torch on 1-element tensors)")
    for column in ("tensors", "grads", "optimizer", "ms / step", "us / tensor"):
        table.add_column(column, justify="right" if column in ("tensors", "ms / step", "us / tensor") else "left")
    for row in rows:
        cells = (str(row["tensors"]), str(row["grads"]), str(row["optimizer"]))
        table.add_row(*cells, f"{row['ms']:.2f}", f"{row['us_per_tensor']:.1f}")
    Console().print(table)
    return rows


if __name__ == "__main__":
    main()
