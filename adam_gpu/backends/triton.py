"""Launcher of the Triton kernel in ``kernels/adam_triton.py``: one launch per (param dtype, moment
dtype, step count) of a group, usually one per group, over the group's tensor table.

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
import triton.language as tl

from adam_gpu.backends import tensor_table
from adam_gpu.device_inputs import DeviceInputs, unused_values
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.quantization import code_maps_on
from adam_gpu.step_tensors import EIGHT_BIT, KERNEL_DTYPES, StepTensors

# Storage types; uint8 is the code type of 8-bit moments.
TRITON_TYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.uint8: tl.uint8,
}


@functools.cache
def _kernels() -> ModuleType:
    from adam_gpu.kernels import adam_triton

    return adam_triton


def runs_interpreted() -> bool:
    """Whether the kernel runs under Triton's CPU interpreter (decided when the kernel module is imported)."""
    if _kernels.cache_info().currsize:
        return isinstance(_kernels().adam_step_kernel, triton.runtime.interpreter.InterpretedFunction)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


FEATURES = frozenset({EIGHT_BIT})


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


def adam_step(
    tensors: StepTensors, steps: list[float] | None, hp: AdamHyperparameters, device_inputs: DeviceInputs | None = None
) -> None:
    kernels = _kernels()
    device = tensors.device
    on_cpu = device.type == "cpu"
    block, chunk = (kernels.INTERPRETER_BLOCK, kernels.INTERPRETER_CHUNK) if on_cpu else (kernels.BLOCK, kernels.CHUNK)
    device_guard = contextlib.nullcontext() if on_cpu else torch.cuda.device(device)
    device_steps = device_inputs.steps if device_inputs else None
    values = device_inputs.values if device_inputs else unused_values(device)
    with device_guard, tensor_table.launch_groups(tensors, steps, hp, chunk, device_steps) as launches:
        for launch in launches:
            table = launch.table
            kernels.adam_step_kernel[(table.n_chunks,)](
                table.pointers,
                table.numels,
                table.chunk_offsets,
                table.n_tensors,
                values,
                *code_maps_on(device),
                *launch.scalars,
                PARAM_TYPE=TRITON_TYPES[launch.param_dtype],
                STATE_TYPE=TRITON_TYPES[launch.state_dtype],
                WEIGHT_DECAY=_weight_decay_mode(hp, kernels),
                AMSGRAD=hp.amsgrad,
                MAXIMIZE=hp.maximize,
                MASTER=launch.master_mode,
                QUANTIZED=launch.state_dtype == torch.uint8,
                DEVICE_STEP=device_steps is not None,
                GRAD_SCALING=bool(device_inputs and device_inputs.grad_scaling),
                CHUNK=chunk,
                BLOCK=block,
                enable_fp_fusion=kernels.FP_FUSION,
            )
