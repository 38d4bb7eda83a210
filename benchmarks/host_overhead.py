"""Host time of one ``step()``: the Python work adam-gpu does around its single launch, on any machine.

On a GPU the launch is asynchronous, so an optimizer step costs the device its memory traffic and the host
its Python: checks, state, the tensor table, step counts. With many small tensors the host part decides
eager step time. This measures it without a GPU: the Triton kernel's launch is replaced by a no-op (the
kernels are not run), and the baselines are torch.optim.AdamW's fused, foreach and for-loop implementations
on 1-element CPU tensors (their arithmetic is then negligible beside their host work), measured in the same
run. Reported: milliseconds per step and microseconds per tensor (median of --repeat timings).

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


def _median_ms(step: Callable[[], object], repeat: int) -> float:
    step()  # state, tables and caches are built outside the timing
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _params(count: int, numel: int) -> list[torch.Tensor]:
    params = [torch.randn(numel, requires_grad=True) for _ in range(count)]
    for param in params:
        param.grad = torch.randn_like(param)
    return params


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
    """One row per (tensor count, optimizer): ms per step and us per tensor."""
    with _launch_stubbed():
        return [row for count in counts for row in _measure(count, repeat)]


def _measure(count: int, repeat: int) -> list[dict[str, object]]:
    contenders = {
        "adam-gpu FusedAdamW (launch stubbed)": FusedAdamW(_params(count, 1), lr=1e-3, backend="triton"),
        "torch AdamW fused": torch.optim.AdamW(_params(count, 1), lr=1e-3, fused=True),
        "torch AdamW foreach": torch.optim.AdamW(_params(count, 1), lr=1e-3, foreach=True),
        "torch AdamW for-loop": torch.optim.AdamW(_params(count, 1), lr=1e-3, foreach=False),
    }
    rows = []
    for name, optimizer in contenders.items():
        ms = _median_ms(optimizer.step, repeat)
        rows.append({"tensors": count, "optimizer": name, "ms": ms, "us_per_tensor": ms * 1e3 / count})
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
    for column in ("tensors", "optimizer", "ms / step", "us / tensor"):
        table.add_column(column, justify="right" if column != "optimizer" else "left")
    for row in rows:
        table.add_row(str(row["tensors"]), str(row["optimizer"]), f"{row['ms']:.2f}", f"{row['us_per_tensor']:.1f}")
    Console().print(table)
    return rows


if __name__ == "__main__":
    main()
