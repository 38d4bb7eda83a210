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
