"""``adam-gpu bench``: run the benchmark on the best device present and write JSON, table and plot."""

from __future__ import annotations

import argparse
import datetime
import itertools
import re
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from adam_gpu.bench import report
from adam_gpu.bench.cases import plan
from adam_gpu.bench.contenders import contenders
from adam_gpu.bench.records import WIDE_SPREAD, Run
from adam_gpu.bench.run import benchmark

RESULTS_STEM = "results"
# A CPU run's default plan ends in about 3 minutes on 2 cores (benchmarks/README.md, "Running on a CPU"): no pair
# starts after this many seconds, unless --time-limit or --full says otherwise.
CPU_TIME_LIMIT_S = 150.0
# The most one contender's measurement of one pair may take, judged from its first step (run.check_time).
CASE_TIME_LIMIT_S = 30.0
# torch's threads on the CPU: with one, steps do not stall when another process holds a core (benchmarks/README.md,
# "Running on a CPU").
CPU_THREADS = 1
SUMMARY_WIDTH = 100  # the terminal summary fits this many columns with every policy name whole
WIDE_MARK = "*"  # the summary's short mark of a wide spread (the report writes "wide")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few small cases: checks the pipeline in seconds")
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"on a CPU, the full sweep (every flat size, GPT-2, every policy; tens of minutes) without the default "
        f"{CPU_TIME_LIMIT_S:.0f} s limit; a GPU run is always full",
    )
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
        f"written, and the report lists what was not (default: {CPU_TIME_LIMIT_S:.0f} on a CPU without --full, "
        "else none)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=CPU_THREADS,
        metavar="N",
        help="torch's intra-op threads on a CPU (default: %(default)s, steady timings on shared cores; 0: torch's "
        "own default)",
    )
    parser.add_argument(
        "--case-time-limit",
        type=float,
        default=CASE_TIME_LIMIT_S,
        metavar="SECONDS",
        help="skip, and report as too slow, a contender whose first step says its measurement of a pair would take "
        "longer (default: %(default).0f; 0: no limit)",
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
    """Per case and policy: the best adam-gpu contender against torch's fused AdamW, in 100 columns; policy names
    fold rather than shorten, so that narrower terminals still tell them apart."""
    title = f"adam-gpu bench on {run.environment['device']}"
    if run.environment.get("device_type") == "cuda":
        title += f" (copy bandwidth {run.copy_gbps:.0f} GB/s)"
    caption = f"{WIDE_MARK} wide spread: (p80 - p20) / median over {100 * WIDE_SPREAD:.0f} %, of this or torch fused"
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    table.add_column("case", no_wrap=True)
    table.add_column("policy", overflow="fold")
    table.add_column("adam-gpu", no_wrap=True)
    for column in ("ms", "spread", "GB/s"):
        table.add_column(column, justify="right", no_wrap=True)
    pct = any(r.pct_copy is not None for r in run.records)
    if pct:
        table.add_column("% copy", justify="right", no_wrap=True)
    table.add_column("vs fused", justify="right", no_wrap=True)
    pairs = dict.fromkeys((r.case, r.policy) for r in run.records)
    for case, policy in pairs:
        best = report.best_adam_gpu(run, case, policy)
        if best is None:
            continue
        cells = [
            case,
            policy,
            best.contender.removeprefix(f"{report.ADAM_GPU_FAMILY} "),
            report.format_ms(best.median_ms),
            report.format_spread(best, WIDE_MARK),
            report.format_gbps(best.gbps),
        ]
        if pct:
            cells.append(report.format_pct(best.pct_copy))
        cells.append(report.speedup_text(run, best, "speedup_vs_torch_fused", WIDE_MARK))
        table.add_row(*cells)
    return table


def _plan_line(pairs: int, time_limit_s: float | None, case_time_limit_s: float | None, cpu_default: bool) -> str:
    line = f"{pairs} (case, policy) pairs x {len(contenders())} contenders"
    if time_limit_s is not None:
        line += f"; no pair starts after {time_limit_s:.0f} s"
    if case_time_limit_s is not None:
        line += f"; a measurement its first step puts over {case_time_limit_s:.0f} s is skipped as too slow"
    if cpu_default:
        line += "; about 3 minutes on 2 cores (--full: the full CPU sweep, tens of minutes)"
    return line


def run_command(args: argparse.Namespace, console: Console) -> int:
    if args.report is not None:
        return report.main_report(args.report, args.out)
    device = pick_device(args.device)
    if not console.is_terminal:  # a log file: whole lines, and the summary table at the width it is made for
        console.width = SUMMARY_WIDTH
    if device.type == "cpu":
        console.print(
            "[bold]No CUDA device: measuring adam-gpu's torch backend against torch.optim's CPU for-loop, "
            "foreach and fused AdamW. The GPU kernels (triton, cupy) were not measured.[/]",
            soft_wrap=True,
        )
        if args.threads:
            torch.set_num_threads(args.threads)
    out = output_folder(args.out, args.force, f"{datetime.date.today()}-{slug(device_name(device))}")
    json_path = out / f"{RESULTS_STEM}.json"
    try:
        pairs = plan(args.quick, device.type, args.cases, args.policies, args.full)
    except ValueError as error:
        raise SystemExit(f"adam-gpu bench: {error}") from None
    out.mkdir(parents=True, exist_ok=True)
    cpu_default = device.type == "cpu" and not (args.quick or args.full or args.cases)
    time_limit_s = CPU_TIME_LIMIT_S if args.time_limit is None and cpu_default else args.time_limit
    case_time_limit_s = args.case_time_limit or None
    # Whole lines, never wrapped: a log file gets one line per (case, policy).
    say = lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(_plan_line(len(pairs), time_limit_s, case_time_limit_s, cpu_default))
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
            time_limit_s=time_limit_s,
            only=args.cases,
            policies=args.policies,
            full=args.full,
            case_time_limit_s=case_time_limit_s,
            log=say,
        )
    run.to_json(json_path)
    written = report.write_reports(run, out, RESULTS_STEM)
    console.print(summary(run))
    if run.not_measured:
        left = len(run.not_measured)
        console.print(f"time limit ({run.time_limit_s:.0f} s): {left} (case, policy) pairs not measured")
    say(f"done in {run.elapsed_s:.0f} s; wrote {json_path}, {written['markdown']}, {written['plot']}")
    return 0
