"""Launcher of the CUDA C kernel ``kernels/adam_cuda.cu`` through CuPy: NVRTC compiles each
specialization on first use (cached per device and specialization), and one launch per group runs on
torch's current stream on torch's own memory. The kernel gets raw addresses (a tensor table and int64
arguments), not CuPy arrays: no copies, and no need for a bf16 dtype that CuPy does not have."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cupy
import numpy as np
import torch

from adam_gpu.backends import cuda_source
from adam_gpu.backends.launch_config import Override
from adam_gpu.device_inputs import DeviceInputs, unused_values
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.kernel_abi import CUDA_PARAMETERS
from adam_gpu.step_tensors import KERNEL_DTYPES, StepTensors
from adam_gpu.storage_formats import MOMENT_FEATURES

# Threads per block (a multiple of 32: 8-bit moments take a warp per quantization block), blocks per SM the
# grid-stride loop over chunks is sized for, and elements per chunk: the best of adam-gpu tune on an H200
# (docs/benchmarks.md, "Launch configurations").
THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 16
CHUNK = 16384


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernel is launched: ``chunk`` elements per chunk (a multiple of 8; of 256 for 8-bit moments),
    ``threads_per_block`` (a multiple of 32, at most 1024: 8-bit moments take a warp per 256 elements), and a
    grid of ``blocks_per_sm`` blocks per SM (fewer when there are fewer chunks) striding over the chunks.
    The defaults are the constants above."""

    chunk: int = CHUNK
    threads_per_block: int = THREADS_PER_BLOCK
    blocks_per_sm: int = BLOCKS_PER_SM

    def __post_init__(self) -> None:
        if self.chunk <= 0 or self.chunk % 8:
            raise ValueError(f"chunk must be a positive multiple of 8, got {self.chunk}")
        if not 32 <= self.threads_per_block <= 1024 or self.threads_per_block % 32:
            raise ValueError(f"threads_per_block must be a multiple of 32 up to 1024, got {self.threads_per_block}")
        if self.blocks_per_sm < 1:
            raise ValueError(f"blocks_per_sm must be at least 1, got {self.blocks_per_sm}")

    def grid(self, n_chunks: int, multiprocessors: int) -> int:
        """Blocks to launch for ``n_chunks`` chunks: one per chunk, at most ``blocks_per_sm`` per SM."""
        return max(1, min(n_chunks, multiprocessors * self.blocks_per_sm))


# How CuPy must get an argument of each C type: an address as a Python int (CuPy passes it as 64 bits), an integer
# or a float as the numpy scalar of its width (a Python float would reach the kernel as a double).
_NUMPY_TYPES = {"int": np.int32, "long long": np.int64, "float": np.float32}
_PACKERS = tuple(int if p.ctype.endswith("*") else _NUMPY_TYPES[p.ctype] for p in CUDA_PARAMETERS)

# `with launch_config(LaunchConfig(...)):` launches with that configuration instead of the defaults.
launch_config: Override[LaunchConfig] = Override("adam_gpu.backends.cupy.launch_config")


@functools.cache  # (built once: its validation is a few microseconds of every step)
def default_launch_config(device: torch.device) -> LaunchConfig:
    return LaunchConfig()


def current_launch_config(device: torch.device) -> LaunchConfig:
    """What a launch on ``device`` uses now: the active ``launch_config(...)``, else the defaults."""
    return launch_config.get() or default_launch_config(device)


FEATURES = MOMENT_FEATURES


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
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cupy_stream(stream: torch.cuda.Stream) -> cupy.cuda.Stream:
    """torch's stream as CuPy's, to launch on: ``Stream.from_external`` where CuPy has it (14+) and torch's
    stream speaks the CUDA stream protocol (``__cuda_stream__``, torch 2.10+), else ``ExternalStream`` (the
    extras allow CuPy 13 and the dependencies torch 2.4)."""
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device_index)


def adam_step(
    tensors: StepTensors, steps: list[float] | None, hp: AdamHyperparameters, device_inputs: DeviceInputs | None = None
) -> None:
    device_index = tensors.device.index if tensors.device.index is not None else torch.cuda.current_device()
    config = current_launch_config(tensors.device)

    def launch(request: cuda_source.KernelLaunch) -> None:
        grid = config.grid(request.table.n_chunks, _multiprocessors(device_index))
        arguments = tuple([pack(value) for pack, value in zip(_PACKERS, request.arguments(), strict=True)])
        _kernel(device_index, request.name_expression)((grid,), (config.threads_per_block,), arguments)

    with cupy.cuda.Device(device_index), _cupy_stream(torch.cuda.current_stream(device_index)):
        cuda_source.for_each_launch(
            tensors, steps, hp, config.chunk, device_inputs, unused_values(torch.device("cuda", device_index)), launch
        )
