"""``adam-gpu info``: exits 0 and names the versions, every backend, and why the triton backend cannot run;
``adam-gpu --help`` is plain text."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from adam_gpu import cli, dispatch


def _console_script() -> list[str]:
    # The interpreter's own scripts folder first: a PATH entry could belong to another Python.
    path = shutil.which("adam-gpu", path=sysconfig.get_path("scripts")) or shutil.which("adam-gpu")
    if path is None:
        pytest.skip("the adam-gpu console script is not on PATH (the package is not pip-installed)")
    return [path]


def _run_info(command: list[str], interpret: bool) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "ADAM_GPU_BACKEND")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([*command, "info"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command} info failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _cpu_row(output: str) -> dict[str, str]:
    """The CPU's lines as {backend or "auto picks": cell}: the indented ``name: cell`` lines under ``cpu: ...``."""
    lines = output.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("cpu: ")) + 1
    row = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        name, _, cell = line.strip().partition(": ")
        row[name] = cell.strip()
    return row


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


COMMANDS = [
    pytest.param(lambda: [sys.executable, "-m", "adam_gpu.cli"], id="python-m"),
    pytest.param(_console_script, id="console-script"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("interpret", [False, True], ids=["no-interpreter", "interpreter"])
def test_info(command, interpret: bool) -> None:
    """One run per case checks everything: each run costs about 2 s of imports."""
    output = _run_info(command(), interpret)
    assert f"torch {torch.__version__}" in output, output
    assert f"triton {_installed_version('triton')}" in output, output

    cpu = _cpu_row(output)
    # The package's own backends: the tests add a host-execution backend to the table in this process only.
    package_backends = {name for name, backend in dispatch.BACKENDS.items() if backend.module.startswith("adam_gpu.")}
    assert package_backends <= set(cpu), f"backends missing from the table:\n{output}"
    assert cpu["torch"] == "available", output
    # torch's fused kernel for same-dtype state; the compiled kernel for the rest, where a compiler is found.
    compiled = dispatch.unavailable_reason("cpu", torch.device("cpu"), [torch.float32]) is None
    by_kind = "fp32: torch, 16-bit: torch, fp32 state beside 16-bit params: cpu, 8-bit moments: cpu"
    assert cpu["auto picks"] == (by_kind if compiled else "torch"), output
    if importlib.util.find_spec("triton") is None:
        return  # the triton cell then gives the install hint, whatever TRITON_INTERPRET says
    if interpret:
        assert cpu["triton"] == "available", output
    else:
        assert cpu["triton"].startswith("no: tensors are on the CPU"), output
        assert "TRITON_INTERPRET=1" in cpu["triton"], output


def test_main_info_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    output = capsys.readouterr().out
    assert f"torch {torch.__version__}" in output
    assert set(dispatch.BACKENDS) <= set(_cpu_row(output)), output


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists every command in words, with no reStructuredText or rich markup left in."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    assert all(name in output for name in ("info", *cli.BENCH_COMMANDS)), output
    assert not any(markup in output for markup in ("``", "[/", "[bold", ":func:")), output


@pytest.mark.parametrize("argv", [["no-such-command"], []], ids=["unknown", "missing"])
def test_bad_subcommand_exits_nonzero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code not in (0, None)
    assert "usage: adam-gpu" in capsys.readouterr().err
