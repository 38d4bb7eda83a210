"""Launcher of the Triton kernel in ``kernels/adam_triton.py``: one launch per (param dtype, moment
dtype, step count) of a group, usually one per group, over the group's tensor table.

The kernel module is imported on first use (``@triton.jit`` reads TRITON_INTERPRET at that moment) and
Triton compiles on the first launch of each specialization; importing this module compiles nothing.
The launch configuration (chunk and block sizes, warps per program) is ``current_launch_config(device)``:
the constants below and in the kernel module, or a ``LaunchConfig`` set with ``launch_config(...)``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import triton
import triton.language as tl

from adam_gpu.backends import tensor_table
from adam_gpu.backends.compiled_launch import CompiledLaunches
from adam_gpu.backends.launch_config import Override, is_power_of_two
from adam_gpu.device_inputs import DeviceInputs, unused_values
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.kernel_abi import weight_decay_mode
from adam_gpu.step_tensors import KERNEL_DTYPES, LaunchMemo, StepTensors
from adam_gpu.storage_formats import MOMENT_FEATURES, SCALE_BLOCK, STORAGE_TYPES, scaled_format

# The Triton dtype of each storage dtype (codes of a scaled moment format: the kernel's QUANTIZED launches).
TRITON_TYPES = {storage.dtype: getattr(tl, storage.triton) for storage in STORAGE_TYPES}


# Warps per program on a GPU (the interpreter ignores it), for plain and 8-bit launches: the best of adam-gpu tune
# on an H200 (docs/benchmarks.md, "Launch configurations").
NUM_WARPS = 8
QUANTIZED_NUM_WARPS = 4


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernel is launched: ``chunk`` elements per program (one chunk of one tensor: the grid is the
    group's chunk count), ``block`` elements per loop iteration of a program (a power of two that divides
    ``chunk``; a multiple of 256 for 8-bit moments), ``num_warps`` warps per program (a power of two).
    The defaults are the kernel module's CHUNK and BLOCK (INTERPRETER_CHUNK/BLOCK on the CPU) and NUM_WARPS; for
    launches of 8-bit moments on a GPU, its QUANTIZED_BLOCK and QUANTIZED_NUM_WARPS."""

    chunk: int
    block: int
    num_warps: int = NUM_WARPS

    def __post_init__(self) -> None:
        if not is_power_of_two(self.block) or self.chunk % self.block:
            raise ValueError(f"block must be a power of two dividing chunk, got block {self.block}, chunk {self.chunk}")
        if not is_power_of_two(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"num_warps must be a power of two up to 32, got {self.num_warps}")


# `with launch_config(LaunchConfig(...)):` launches with that configuration instead of the defaults.
launch_config: Override[LaunchConfig] = Override("adam_gpu.backends.triton.launch_config")


@functools.cache
def _kernels() -> ModuleType:
    from adam_gpu.kernels import adam_triton

    return adam_triton


@functools.cache
def _launcher() -> CompiledLaunches | None:
    """The compiled kernel's launches (None under the interpreter: ``kernel[grid]`` runs it)."""
    kernel = _kernels().adam_step_kernel
    return CompiledLaunches(kernel) if isinstance(kernel, triton.runtime.jit.JITFunction) else None


def runs_interpreted() -> bool:
    """Whether the kernel runs under Triton's CPU interpreter (decided when the kernel module is imported)."""
    if _kernels.cache_info().currsize:
        return isinstance(_kernels().adam_step_kernel, triton.runtime.interpreter.InterpretedFunction)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=256)  # (a step asks twice: kept, not built and validated each time)
def default_launch_config(device: torch.device, largest: int | None = None, quantized: bool = False) -> LaunchConfig:
    """The kernel module's constants (``quantized``: for a launch of 8-bit moments; the chunk is the same, as
    one step's launches share their tables' chunking): large blocks and chunks under the CPU interpreter, where
    a program costs the same whatever its size. There, a step whose ``largest`` tensor fits one block gets a
    single block of the next power of two (at least storage_formats.SCALE_BLOCK) as its chunk: masked lanes cost
    the interpreter as much as live ones (a 4096-element MLP took 16x the time at 65536/16384)."""
    kernels = _kernels()
    if device.type != "cpu":
        if quantized:
            return LaunchConfig(kernels.CHUNK, kernels.QUANTIZED_BLOCK, QUANTIZED_NUM_WARPS)
        return LaunchConfig(kernels.CHUNK, kernels.BLOCK)
    if largest is not None and largest <= kernels.INTERPRETER_BLOCK:
        block = max(SCALE_BLOCK, triton.next_power_of_2(largest))
        return LaunchConfig(block, block)
    return LaunchConfig(kernels.INTERPRETER_CHUNK, kernels.INTERPRETER_BLOCK)


def current_launch_config(device: torch.device, largest: int | None = None, quantized: bool = False) -> LaunchConfig:
    """What a launch on ``device`` uses now: the active ``launch_config(...)`` (for every launch), else the
    defaults (for a step whose largest tensor has ``largest`` elements; ``quantized``: of 8-bit moments)."""
    return launch_config.get() or default_launch_config(device, largest, quantized)


FEATURES = MOMENT_FEATURES


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


def _largest_numel(tensors: StepTensors) -> int:
    """The most elements of one param, kept in ``tensors.memo`` (a read per param otherwise)."""
    memo = tensors.memo if tensors.memo is not None else LaunchMemo()
    if memo.largest_numel is None:
        memo.largest_numel = max((p.numel() for p in tensors.params), default=0)
    return memo.largest_numel


def adam_step(
    tensors: StepTensors, steps: list[float] | None, hp: AdamHyperparameters, device_inputs: DeviceInputs | None = None
) -> None:
    kernels = _kernels()
    device = tensors.device
    on_cpu = device.type == "cpu"
    largest = _largest_numel(tensors) if on_cpu else None
    chunk = current_launch_config(device, largest).chunk
    # (Triton launches on the current device: entering the guard costs a few us where it already is.)
    index = 0 if on_cpu else device.index
    current = on_cpu or torch.cuda.current_device() == index
    device_guard = contextlib.nullcontext() if current else torch.cuda.device(device)
    device_steps = device_inputs.steps if device_inputs else None
    values = device_inputs.values if device_inputs else unused_values(device)
    launcher = _launcher()
    decay = weight_decay_mode(hp.weight_decay, hp.decoupled)
    with device_guard, tensor_table.launch_groups(tensors, steps, hp, chunk, device_steps) as launches:
        for launch in launches:
            table = launch.table
            scaled = scaled_format(launch.state_dtype)
            quantized = scaled is not None
            config = current_launch_config(device, largest, quantized)
            if quantized and config.block % scaled.scale.block:
                block = scaled.scale.block
                raise ValueError(f"{scaled.feature} need a block that is a multiple of {block}, got {config}")
            args = (table.pointers, table.numels, table.chunk_offsets, table.n_tensors, values)
            constexprs = {
                "PARAM_TYPE": TRITON_TYPES[launch.param_dtype],
                "STATE_TYPE": TRITON_TYPES[launch.state_dtype],
                "WEIGHT_DECAY": decay,
                "AMSGRAD": hp.amsgrad,
                "MAXIMIZE": hp.maximize,
                "MASTER": launch.master_mode,
                "QUANTIZED": quantized,
                "DEVICE_STEP": device_steps is not None,
                "GRAD_SCALING": bool(device_inputs and device_inputs.grad_scaling),
                "CHUNK": config.chunk,
                "BLOCK": config.block,
            }
            options = (("num_warps", config.num_warps), ("enable_fp_fusion", kernels.FP_FUSION))
            if launcher is None:
                kernels.adam_step_kernel[(table.n_chunks,)](*args, *launch.scalars, **constexprs, **dict(options))
            else:
                launcher(table.n_chunks, index, args, launch.scalars, constexprs, options)
