"""``adam-gpu bench``: run the benchmark on the best device present and write JSON, table and plot."""

from __future__ import annotations

import argparse
import datetime
import itertools
import re
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from adam_gpu.bench import report
from adam_gpu.bench.cases import plan
from adam_gpu.bench.contenders import contenders
from adam_gpu.bench.records import Run
from adam_gpu.bench.run import benchmark

RESULTS_STEM = "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few small cases: checks the pipeline in seconds")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda if present")
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: a new bench-results/<date>-<device>[-N]); one that holds a run is refused "
        "unless --force",
    )
    parser.add_argument("--force", action="store_true", help="write over the run already in --out")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="only redraw the table and plot from a JSON; several (one device's run and reruns of the pairs it "
        "left) are merged into --out",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        metavar="CASE",
        help="measure these cases only (e.g. gpt2-124m 'flat 2^26'), every policy of each",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        metavar="POLICY",
        help="measure these precision policies only (e.g. fp32 bf16+fp32-moments), of every case or of --cases",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start no (case, policy) after this long (the headline cases come first); what was measured is "
        "written, and the report lists what was not",
    )


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("adam-gpu bench: --device cuda, but torch.cuda.is_available() is False")
    return torch.device(choice)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def output_folder(out: Path | None, force: bool, name: str, root: Path = Path("bench-results")) -> Path:
    """Where a run writes: ``out``, unless it holds a run already (refused without ``force``); by default a new
    folder ``root/name``, ``root/name-2``, ... (no run is overwritten unless asked)."""
    if out is not None:
        if (out / f"{RESULTS_STEM}.json").exists() and not force:
            raise SystemExit(
                f"adam-gpu bench: {out} holds a run already: pass --force to write over it, or another --out"
            )
        return out
    candidates = (root / (name if n == 1 else f"{name}-{n}") for n in itertools.count(1))
    return next(folder for folder in candidates if not folder.exists())


def summary(run: Run) -> Table:
    """Per case and policy: the best adam-gpu contender against torch's fused AdamW."""
    table = Table(title=f"adam-gpu bench on {run.environment['device']} (copy bandwidth {run.copy_gbps:.0f} GB/s)")
    for column in ("case", "policy", "best adam-gpu", "ms", "GB/s", "% copy", "vs torch fused"):
        table.add_column(column)
    pairs = dict.fromkeys((r.case, r.policy) for r in run.records)
    for case, policy in pairs:
        best = report.best_adam_gpu(run, case, policy)
        if best is None:
            continue
        table.add_row(
            case,
            policy,
            best.contender,
            report.format_ms(best.median_ms),
            report.format_gbps(best.gbps),
            report.format_pct(best.pct_copy),
            report.format_speedup(best.speedup_vs_torch_fused),
        )
    return table


def run_command(args: argparse.Namespace, console: Console) -> int:
    if args.report is not None:
        return report.main_report(args.report, args.out)
    device = pick_device(args.device)
    if device.type == "cpu":
        console.print(
            "[bold]No CUDA device: measuring adam-gpu's torch backend against torch.optim's CPU for-loop, "
            "foreach and fused AdamW. The GPU kernels (triton, cupy) were not measured.[/]"
        )
    out = output_folder(args.out, args.force, f"{datetime.date.today()}-{slug(device_name(device))}")
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{RESULTS_STEM}.json"
    try:
        pairs = plan(args.quick, device.type, args.cases, args.policies)
    except ValueError as error:
        raise SystemExit(f"adam-gpu bench: {error}") from None
    total = len(pairs) * len(contenders())
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=total)

        def advance(description: str) -> None:
            progress.update(task, advance=1, description=description)

        save = lambda partial: partial.to_json(json_path)  # noqa: E731
        run = benchmark(
            device,
            args.quick,
            advance,
            checkpoint=save,
            time_limit_s=args.time_limit,
            only=args.cases,
            policies=args.policies,
        )
    run.to_json(json_path)
    written = report.write_reports(run, out, RESULTS_STEM)
    console.print(summary(run))
    if run.not_measured:
        left = len(run.not_measured)
        console.print(f"time limit ({args.time_limit:.0f} s): {left} (case, policy) pairs not measured")
    console.print(f"wrote {json_path}, {written['markdown']}, {written['plot']}")
    return 0
