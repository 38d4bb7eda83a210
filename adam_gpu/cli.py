"""The ``adam-gpu`` command: ``adam-gpu info`` says what runs here and why the rest does not;
``adam-gpu bench`` measures every backend against the framework optimizers (adam_gpu.bench);
``adam-gpu tune`` measures the kernel backends' launch configurations (adam_gpu/bench/tune.py)."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence

import torch
from rich.console import Console
from rich.table import Table

from adam_gpu import __version__, dispatch, step_signature
from adam_gpu.bench import command as bench_command
from adam_gpu.bench import tune_command
from adam_gpu.step_tensors import EIGHT_BIT, KERNEL_DTYPES
from adam_gpu.versions import package_version


def _devices() -> list[torch.device]:
    cuda = [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return [*cuda, torch.device("cpu")]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device}: {torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"cpu: {platform.processor() or platform.machine()}"


# A step of each kind backend="auto" orders apart (dispatch.AUTO_ORDER): its param dtypes and features.
_STEP_KINDS = {
    "fp32": ({torch.float32}, ()),
    "16-bit": ({torch.bfloat16, torch.float16}, ()),
    "8-bit moments": ({torch.bfloat16}, (EIGHT_BIT,)),
}


def _auto_picks(device: torch.device) -> str:
    """What backend="auto" picks on ``device`` for each kind of step, or the one name where they agree."""
    picks = {}
    for kind, (dtypes, features) in _STEP_KINDS.items():
        try:
            picks[kind], _ = dispatch.resolve(dispatch.AUTO, device, dtypes, features)
        except dispatch.BackendUnavailableError:
            picks[kind] = "none"
    if len(set(picks.values())) == 1:
        return next(iter(picks.values()))
    return ", ".join(f"{kind}: {name}" for kind, name in picks.items())


def info(console: Console) -> None:
    console.print(f"adam-gpu {__version__}, Python {platform.python_version()}")
    console.print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"triton {package_version('triton')}, cupy {package_version('cupy')}"
    )
    if torch.cuda.is_available():
        console.print(f"CUDA devices: {torch.cuda.device_count()}, torch built for CUDA {torch.version.cuda}")
    else:
        console.print("CUDA: no device visible (torch.cuda.is_available() is False); only the CPU row applies")
    console.print(f"Reused steps (tensors unchanged since the last full check): {step_signature.reuse_description()}")
    table = Table(title="Backends: available for float32/float16/bfloat16 params, or why not")
    table.add_column("device")
    for name in dispatch.BACKENDS:
        table.add_column(name)
    table.add_column("auto picks")
    for device in _devices():
        reasons = {name: dispatch.unavailable_reason(name, device, KERNEL_DTYPES) for name in dispatch.BACKENDS}
        picked = _auto_picks(device)
        cells = ["[green]available[/]" if reason is None else f"[red]no[/]: {reason}" for reason in reasons.values()]
        table.add_row(_device_name(device), *cells, picked)
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adam-gpu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="device, versions, and which backends run here (and why the others don't)")
    bench = commands.add_parser("bench", help="benchmark every backend against torch.optim and other optimizers")
    bench_command.add_arguments(bench)
    tune = commands.add_parser("tune", help="measure the triton and cupy backends' launch configurations")
    tune_command.add_arguments(tune)
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "bench":
        return bench_command.run_command(args, console)
    if args.command == "tune":
        return tune_command.run_command(args, console)
    info(console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
