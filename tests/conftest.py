"""Test set-up: on a machine without CUDA, Triton kernels run under Triton's CPU interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` is applied, i.e. when the kernel module is imported,
so it must be set here, before any test imports a kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_terminal_summary(terminalreporter):
    """Print what tests measured for the log (register counts per arch and specialization)."""
    from support import REPORT

    for title, lines in REPORT.items():
        terminalreporter.write_sep("-", title)
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionstart(session):
    """A run asked to use the compiled reused-step proof (adam_gpu.native_guards) uses it, or stops saying why."""
    from adam_gpu import native_guards

    if os.environ.get(native_guards.ENV_VAR) == "1" and native_guards.snapshot_type() is None:
        why = native_guards.build_error()
        raise RuntimeError(f"{native_guards.ENV_VAR}=1 but the compiled snapshot is not built: {why}")
