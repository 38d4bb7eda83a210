"""Launcher of the Triton kernel in ``kernels/adam_triton.py``: tensors in, kernel arguments out.

The kernel module is imported on first use (``@triton.jit`` reads TRITON_INTERPRET at that moment) and
Triton compiles on the first launch of each specialization; importing this module compiles nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType

import torch
import triton

from adam_gpu.backends.layout import contiguous_stand_ins
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.step_tensors import KERNEL_DTYPES, StepTensors


@functools.cache
def _kernels() -> ModuleType:
    from adam_gpu.kernels import adam_triton

    return adam_triton


def runs_interpreted() -> bool:
    """Whether the kernel runs under Triton's CPU interpreter (decided when the kernel module is imported)."""
    if _kernels.cache_info().currsize:
        return isinstance(_kernels().adam_step_kernel, triton.runtime.interpreter.InterpretedFunction)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"the Triton kernel stores float32, float16 and bfloat16, not {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if runs_interpreted():
            return None
        return (
            "tensors are on the CPU: Triton kernels run on CUDA devices "
            "(or under Triton's interpreter with TRITON_INTERPRET=1 set before the first step)"
        )
    return f"tensors are on {device.type}: the Triton kernel runs on CUDA devices"


def _weight_decay_mode(hp: AdamHyperparameters, kernels: ModuleType) -> int:
    if hp.weight_decay == 0:
        return kernels.NO_WEIGHT_DECAY.value
    return (kernels.DECOUPLED if hp.decoupled else kernels.L2).value


def adam_step(tensors: StepTensors, steps: list[float], hp: AdamHyperparameters) -> None:
    kernels = _kernels()
    device = tensors.device
    block = kernels.INTERPRETER_BLOCK if device.type == "cpu" else kernels.BLOCK
    weight_decay_mode = _weight_decay_mode(hp, kernels)
    device_guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with device_guard:
        for step, originals in zip(steps, tensors.per_tensor(), strict=True):
            n_elements = originals[0].numel()
            if n_elements == 0:
                continue
            with contiguous_stand_ins(originals) as (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq):
                kernels.adam_step_kernel[(triton.cdiv(n_elements, block),)](
                    param,
                    grad,
                    exp_avg,
                    exp_avg_sq,
                    max_exp_avg_sq if hp.amsgrad else exp_avg_sq,
                    n_elements,
                    *hp.step_scalars(step),
                    WEIGHT_DECAY=weight_decay_mode,
                    AMSGRAD=hp.amsgrad,
                    MAXIMIZE=hp.maximize,
                    BLOCK=block,
                    enable_fp_fusion=kernels.FP_FUSION,
                )
