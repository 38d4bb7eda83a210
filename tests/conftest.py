"""Test set-up: on a machine without CUDA, Triton kernels run under Triton's CPU interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` is applied, i.e. when the kernel module is imported,
so it must be set here, before any test imports a kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
