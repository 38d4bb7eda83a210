"""Launcher of the CUDA C kernel ``kernels/adam_cuda.cu`` through CuPy: NVRTC compiles each
specialization on first use (cached per device and specialization), and kernels run on torch's
current stream on torch's own memory (raw pointers: no copies, no host synchronization)."""

from __future__ import annotations

import functools

import cupy
import numpy as np
import torch

from adam_gpu.backends import cuda_source
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.step_tensors import KERNEL_DTYPES, StepTensors

# Threads per block, and resident blocks per SM the grid-stride loop is sized for (2048 threads per SM
# on sm_80/sm_90). Not yet tuned on a GPU: the benchmark (issue 5) decides.
THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 8


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"the CUDA C kernel stores float32, float16 and bfloat16, not {dtype}"
    if device.type != "cuda":
        return f"tensors are on {device.type}: the CUDA C kernel runs on CUDA devices"
    if not cupy.cuda.is_available():
        return "CuPy finds no usable CUDA device (is the cupy-cudaXX wheel for torch's CUDA major version?)"
    return None


@functools.cache
def _kernel(device_index: int, name_expression: str) -> cupy.RawKernel:
    """Compile (NVRTC) and load one specialization for one device."""
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(
            code=cuda_source.source(), options=cuda_source.compile_options(), name_expressions=[name_expression]
        )
        return module.get_function(name_expression)


@functools.cache
def _max_blocks(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count * BLOCKS_PER_SM


def adam_step(tensors: StepTensors, steps: list[float], hp: AdamHyperparameters) -> None:
    device_index = tensors.device.index if tensors.device.index is not None else torch.cuda.current_device()

    def launch(request: cuda_source.KernelLaunch) -> None:
        blocks = -(-request.n_elements // (request.pack * THREADS_PER_BLOCK))
        grid = max(1, min(blocks, _max_blocks(device_index)))
        arguments = (*request.pointers, np.int64(request.n_elements), *map(np.float32, request.scalars))
        _kernel(device_index, request.name_expression)((grid,), (THREADS_PER_BLOCK,), arguments)

    with cupy.cuda.Device(device_index), cupy.cuda.Stream.from_external(torch.cuda.current_stream(device_index)):
        cuda_source.for_each_launch(tensors, steps, hp, launch)
