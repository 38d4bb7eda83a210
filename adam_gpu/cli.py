"""The adam-gpu command.

  adam-gpu info    what runs here: devices, versions, and each backend's availability (or why not)
  adam-gpu bench   every backend against torch.optim and other optimizers (needs the bench extra)
  adam-gpu tune    the triton and cupy backends' launch configurations (needs the bench extra)

``info`` needs torch only; ``bench`` and ``tune`` import their modules (and rich, matplotlib) when run.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence
from types import ModuleType

import torch

from adam_gpu import __version__, dispatch
from adam_gpu.step_tensors import KERNEL_DTYPES
from adam_gpu.storage_formats import MOMENT_FEATURES
from adam_gpu.versions import package_version

DESCRIPTION = "Fused Adam/AdamW kernels for PyTorch: what runs here, benchmarks and launch-configuration sweeps."
INFO_HELP = "devices, versions, and which backends run here (and why the others don't)"
# The commands of the bench extra: their help, and the module with add_arguments(parser) and run_command(args, console).
BENCH_COMMANDS = {
    "bench": ("benchmark every backend against torch.optim and other optimizers", "adam_gpu.bench.command"),
    "tune": ("measure the triton and cupy backends' launch configurations", "adam_gpu.bench.tune_command"),
}
BENCH_EXTRA_HINT = "pip install 'adam-gpu[bench]'"


def _devices() -> list[torch.device]:
    cuda = [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return [*cuda, torch.device("cpu")]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device}: {torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"cpu: {platform.processor() or platform.machine()}"


# A step of each kind backend="auto" orders apart (dispatch.AUTO_ORDER): its param dtypes, features and whether its
# state is in another dtype than the params.
_STEP_KINDS = {
    "fp32": ({torch.float32}, (), False),
    "16-bit": ({torch.bfloat16, torch.float16}, (), False),
    "fp32 state beside 16-bit params": ({torch.bfloat16}, (), True),
    **{feature: ({torch.bfloat16}, (feature,), False) for feature in sorted(MOMENT_FEATURES)},  # (bf16: 8-bit's)
}
AUTO_PICKS = "auto picks"


def _auto_picks(device: torch.device) -> str:
    """What backend="auto" picks on ``device`` for each kind of step, or the one name where they agree."""
    picks = {}
    for kind, (dtypes, features, converted) in _STEP_KINDS.items():
        try:
            picks[kind], _ = dispatch.resolve(dispatch.AUTO, device, dtypes, features, converted)
        except dispatch.BackendUnavailableError:
            picks[kind] = "none"
    if len(set(picks.values())) == 1:
        return next(iter(picks.values()))
    return ", ".join(f"{kind}: {name}" for kind, name in picks.items())


def info_lines() -> list[str]:
    """``adam-gpu info``'s output: versions, then each device with every backend's availability on it."""
    lines = [
        f"adam-gpu {__version__}, Python {platform.python_version()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"triton {package_version('triton')}, cupy {package_version('cupy')}",
    ]
    if torch.cuda.is_available():
        lines.append(f"CUDA devices: {torch.cuda.device_count()}, torch built for CUDA {torch.version.cuda}")
    else:
        lines.append("CUDA: no device visible (torch.cuda.is_available() is False); only the CPU applies")
    lines += ["", "Backends for float32/float16/bfloat16 params on each device: available, or why not"]
    width = max(map(len, [*dispatch.BACKENDS, AUTO_PICKS])) + 1
    for device in _devices():
        cells = {name: dispatch.unavailable_reason(name, device, KERNEL_DTYPES) for name in dispatch.BACKENDS}
        cells = {name: "available" if reason is None else f"no: {reason}" for name, reason in cells.items()}
        cells[AUTO_PICKS] = _auto_picks(device)
        lines.append(_device_name(device))
        lines += [f"  {name + ':':<{width}} {cell}" for name, cell in cells.items()]
    return lines


def _bench_module(command: str) -> ModuleType:
    """The module of a bench-extra command, or SystemExit naming the extra when its packages are missing."""
    try:
        return importlib.import_module(BENCH_COMMANDS[command][1])
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] == "adam_gpu":
            raise
        raise SystemExit(f"adam-gpu {command} needs {error.name}, from the bench extra: {BENCH_EXTRA_HINT}") from error


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The command line; only ``command``'s own arguments are loaded, so that ``info`` and ``--help`` import
    nothing of the bench extra."""
    parser = argparse.ArgumentParser(
        prog="adam-gpu", description=DESCRIPTION, epilog="adam-gpu COMMAND --help lists a command's options."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("info", help=INFO_HELP, description=INFO_HELP)
    for name, (help_text, _) in BENCH_COMMANDS.items():
        subparser = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _bench_module(name).add_arguments(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top-level parser has no option taking a value, so the first word that is not an option is the command.
    command = next((word for word in argv if not word.startswith("-")), None)
    args = _parser(command).parse_args(argv)
    if args.command in BENCH_COMMANDS:
        from rich.console import Console  # (the bench extra's: its module imported above)

        return _bench_module(args.command).run_command(args, Console())
    print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
