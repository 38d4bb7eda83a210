"""The CUDA C kernel's host build under AddressSanitizer: a read or write outside any tensor stops the process
with a report, where the plain build would corrupt the heap (or, on a GPU, hit an illegal address).

The kernel's own tests (the CUDA C host build as a backend, tests/cuda_host.py, and the compiled CPU backend, which
calls the same device functions in its own loops) run again in a child process
whose Python loads ASan's runtime first (LD_PRELOAD: a sanitized library loaded by ctypes needs it), over odd
sizes, every storage policy, 8-bit moments, masters, and every change between steps the optimizer refuses or
takes. A control run shows the sanitizer is live: a launch handed a moment shorter than its param (what the
optimizer's checks refuse) must be reported, not pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cuda_host
import pytest
from support import REPO_ROOT

# The cuda-host and cpu cases of these files run sanitized: every kernel path the tests reach.
SANITIZED_TESTS = [
    "tests/test_multi_tensor.py",
    "tests/test_state_changes.py",
    "tests/test_8bit.py",
    "tests/test_master_weights.py",
    "tests/test_step_cache.py",
]

_OVERRUN = """
import torch, cuda_host
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.step_tensors import StepTensors
param = torch.randn(4097)
short = torch.zeros(100)  # (the kernel is handed it as if it had 4097 elements)
tensors = StepTensors([param], [torch.randn(4097)], [torch.zeros(4097)], [short])
cuda_host.adam_step(tensors, [1.0], AdamHyperparameters(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False))
print("the overrun was not reported")
"""


def _asan_runtime() -> str | None:
    if shutil.which("g++") is None:
        return None
    found = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and Path(found).is_file() else None


@pytest.fixture(scope="module")
def sanitized_env(tmp_path_factory) -> dict[str, str]:
    runtime = _asan_runtime()
    if runtime is None:
        pytest.skip("g++ with AddressSanitizer's runtime (libasan) is not installed")
    return {
        **os.environ,
        "LD_PRELOAD": runtime,
        # (Python and torch keep memory to the end by design: leaks are not what this looks for.)
        "ASAN_OPTIONS": "detect_leaks=0",
        cuda_host.SANITIZE_ENV: "1",
        cuda_host.BUILD_CACHE_ENV: str(tmp_path_factory.mktemp("sanitized-build")),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


def test_the_sanitizer_reports_a_kernel_that_reads_past_a_tensor(sanitized_env):
    """The control: the same build and runtime as below, given an overrun on purpose."""
    result = subprocess.run(
        [sys.executable, "-c", _OVERRUN], env=sanitized_env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in result.stderr, (
        f"rc {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    )


def test_the_kernel_tests_pass_under_the_sanitizer(sanitized_env):
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
               "-k", "cuda-host or (cpu and not cuda)", *SANITIZED_TESTS]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=sanitized_env, capture_output=True, text=True, timeout=3000)
    report = f"rc {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert "AddressSanitizer" not in result.stderr, report
    assert result.returncode == 0 and " passed" in result.stdout, report
