"""``adam-gpu tune``: sweep the kernel backends' launch configurations and write JSON and Markdown."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from adam_gpu.bench import tune_report
from adam_gpu.bench.command import device_name, pick_device, slug
from adam_gpu.bench.tune import BACKENDS, TuneRun, sweep, tune_plan
from adam_gpu.bench.tune_report import STEM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny cases, two configurations: checks the pipeline")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda if present")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="default: all")
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="stop starting configurations after this long (the backends share it; each measures its default); "
        "what was measured is written",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: bench-results/<date>-<device>-tune)")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only redraw the Markdown from a sweep's JSON")


def run_command(args: argparse.Namespace, console: Console) -> int:
    if args.report is not None:
        return tune_report.main_report(args.report, args.out)
    device = pick_device(args.device)
    if device.type == "cpu" and not args.quick:
        raise SystemExit("adam-gpu tune: no CUDA device; on the CPU only --quick runs (Triton under its interpreter)")
    out = args.out or Path("bench-results") / f"{datetime.date.today()}-{slug(device_name(device))}-tune"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{STEM}.json"
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("tuning", total=None)

        def planned(run: TuneRun) -> None:
            total = sum(len(configs) for configs in run.plan.values())
            console.print(f"{total} configurations planned, estimated {run.estimate_s:.0f} s on an H100")
            progress.update(task, total=total * len(tune_plan(args.quick)))  # at most: a pair may not run

        def advance(description: str) -> None:
            progress.update(task, advance=1, description=description)

        run = sweep(
            device,
            args.quick,
            args.backends,
            args.time_limit,
            progress=advance,
            checkpoint=lambda partial: partial.to_json(json_path),
            planned=planned,
        )
    run.to_json(json_path)
    markdown = tune_report.write_report(run, out)
    for backend in args.backends:
        ranked = [r for r in tune_report.ranking(run, backend) if r.score is not None]
        if ranked:
            default = next((r for r in ranked if r.default), None)
            versus = "" if default is None else f" (default scores {default.score:.3f})"
            console.print(f"{backend}: best overall {tune_report.format_config(ranked[0].config)}{versus}")
        elif backend in run.stopped:
            console.print(f"{backend}: {run.stopped[backend]}")
    console.print(f"wrote {json_path}, {markdown}")
    return 0
