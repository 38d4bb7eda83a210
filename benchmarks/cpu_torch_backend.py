"""adam-gpu's step on CPU tensors (``backend="auto"``: the torch backend or the compiled cpu one, as the row says)
beside torch.optim.AdamW's, measured side by side in one run: torch's fused CPU kernel where it steps the same thing,
torch foreach on the same params.

Each round times every contender of a row in turn (``--steps`` steps each, after warm-up; the order turns each
round), so a neighbour's load falls on all of them alike; a row reports each contender's median over ``--rounds``
rounds and the median of the per-round ratios. The default is one thread: with both cores shared, a parallel region
waits whenever one of its threads is descheduled (docs/cpu-torch-backend.md).
torch's optimizers cannot keep fp32 moments, masters or 8-bit moments for 16-bit params (foreach raises on mixed
dtypes), so those rows compare with torch foreach on the same 16-bit params and moments in their dtype.

    python benchmarks/cpu_torch_backend.py [--threads 1] [--rounds 21] [--steps 1] [--cases ...] [--policies ...]
                                           [--options adamw amsgrad maximize adam-l2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adam_gpu import FusedAdam, FusedAdamW

HP = {"lr": 1e-3, "weight_decay": 0.01}
# The options torch's fused CPU kernel has, each timed as its own rows (AdamW's decoupled decay unless "adam-l2").
OPTIONS = {"adamw": {}, "amsgrad": {"amsgrad": True}, "maximize": {"maximize": True}, "adam-l2": {}}
CASES = {"flat 2^20": (1, 2**20), "flat 2^22": (1, 2**22), "64 x 2^14": (64, 2**14)}


@dataclass(frozen=True)
class Policy:
    name: str
    dtype: torch.dtype
    options: dict  # FusedAdamW's state_dtype / master_weights
    fused_baseline: bool  # whether torch's fused kernel steps the same thing


POLICIES = {
    policy.name: policy
    for policy in (
        Policy("fp32", torch.float32, {}, True),
        Policy("bf16", torch.bfloat16, {}, True),
        Policy("bf16+fp32-moments", torch.bfloat16, {"state_dtype": torch.float32}, False),
        Policy("bf16+fp32-master", torch.bfloat16, {"state_dtype": torch.float32, "master_weights": True}, False),
        Policy("bf16+lean-master", torch.bfloat16, {"state_dtype": torch.float32, "master_weights": "lean"}, False),
        Policy("bf16+8bit-moments", torch.bfloat16, {"state_dtype": "8bit"}, False),
        Policy("fp16", torch.float16, {}, True),
        Policy("fp16+fp32-moments", torch.float16, {"state_dtype": torch.float32}, False),
        Policy("fp16+fp32-master", torch.float16, {"state_dtype": torch.float32, "master_weights": True}, False),
        Policy("fp16+8bit-moments", torch.float16, {"state_dtype": "8bit"}, False),
    )
}


def _params(count: int, numel: int, dtype: torch.dtype, generator: torch.Generator) -> list[torch.Tensor]:
    params = []
    for _ in range(count):
        param = torch.randn(numel, generator=generator).to(dtype)
        param.grad = torch.randn(numel, generator=generator).to(dtype)
        params.append(param)
    return params


def _contenders(policy: Policy, count: int, numel: int, option: str) -> dict[str, torch.optim.Optimizer]:
    """Each contender's optimizer on its own copy of the same params and grads, with ``option``'s settings."""
    generator = torch.Generator().manual_seed(0)
    params = _params(count, numel, policy.dtype, generator)

    def twin() -> list[torch.Tensor]:
        copies = [p.clone() for p in params]
        for copy, param in zip(copies, params, strict=True):
            copy.grad = param.grad.clone()
        return copies

    ours, theirs = (FusedAdam, torch.optim.Adam) if option == "adam-l2" else (FusedAdamW, torch.optim.AdamW)
    settings = {**HP, **OPTIONS[option]}
    optimizers = {"adam-gpu auto": ours(twin(), backend="auto", **settings, **policy.options)}
    if policy.fused_baseline:
        optimizers["torch fused"] = theirs(twin(), fused=True, **settings)
    optimizers["torch foreach"] = theirs(twin(), foreach=True, **settings)
    return optimizers


def _seconds(step: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(policy: Policy, case: str, rounds: int, steps: int, option: str = "adamw") -> dict[str, object]:
    """Median ms a step of each contender, and the median over rounds of foreach's (and fused's) time over ours."""
    optimizers = _contenders(policy, *CASES[case], option)
    contenders = {name: optimizer.step for name, optimizer in optimizers.items()}
    with torch.no_grad():
        for step in contenders.values():
            _seconds(step, 2)  # (state, tables)
        times = {name: [] for name in contenders}
        names = list(contenders)
        for round_index in range(rounds):  # (the order turns each round: no contender always runs first)
            for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                times[name].append(_seconds(contenders[name], steps))
    ours = times["adam-gpu auto"]
    row: dict[str, object] = {"policy": policy.name if option == "adamw" else f"{policy.name}, {option}", "case": case}
    row["auto ran"] = optimizers["adam-gpu auto"].selected_backends[0]
    row.update({name: statistics.median(seconds) * 1e3 for name, seconds in times.items()})
    for name in contenders.keys() - {"adam-gpu auto"}:
        row[f"{name} / ours"] = statistics.median(theirs / mine for theirs, mine in zip(times[name], ours, strict=True))
    return row


def table(rows: list[dict[str, object]]) -> str:
    def cell(row: dict[str, object], key: str, unit: str) -> str:
        return f"{row[key]:.2f}{unit}" if key in row else "-"

    lines = [
        "| policy | case | auto ran | adam-gpu auto ms | torch fused ms | torch foreach ms | vs fused | vs foreach |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [cell(row, key, "") for key in ("adam-gpu auto", "torch fused", "torch foreach")]
        ratios = [cell(row, f"{name} / ours", "x") for name in ("torch fused", "torch foreach")]
        lines.append(f"| {row['policy']} | {row['case']} | {row['auto ran']} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every contender")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=1, help="steps timed together in one round")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--options", nargs="+", default=["adamw"], choices=list(OPTIONS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [
        measure(POLICIES[p], case, args.rounds, args.steps, option)
        for option in args.options
        for p in args.policies
        for case in args.cases
    ]
    header = (
        f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, {args.threads} of {os.cpu_count()} cores, "
        f"torch {torch.__version__}, median of {args.rounds} rounds of {args.steps} steps;"
        " a ratio over 1: adam-gpu is faster"
    )
    report = header + "\n\n" + table(rows)
    print(report)
    return report


if __name__ == "__main__":
    main()
