"""Launcher of the CUDA C kernel ``kernels/adam_cuda.cu`` through CuPy: NVRTC compiles each
specialization on first use (cached per device and specialization, loaded by CuPy), and one launch per group runs
on torch's current stream on torch's own memory. The kernel gets raw addresses (a tensor table and int64
arguments), not CuPy arrays: no copies, and no need for a bf16 dtype that CuPy does not have.

Launches go straight to the driver (``cuLaunchKernel`` through CuPy's binding), with the kernel's parameters packed
once into a buffer in their C layout: what ``RawKernel.__call__`` does, less its per-argument Python objects and
its device and stream contexts (docs/benchmarks.md, "Host time of a step")."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import struct
import threading
from dataclasses import dataclass

import cupy
import torch
from cupy_backends.cuda.api import driver as cuda_driver
from cupy_backends.cuda.api import runtime as cuda_runtime

from adam_gpu.backends import cuda_source
from adam_gpu.backends.launch_config import Override
from adam_gpu.device_inputs import DeviceInputs, unused_values
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.kernel_abi import CUDA_PARAMETERS
from adam_gpu.step_tensors import KERNEL_DTYPES, StepTensors
from adam_gpu.storage_formats import MOMENT_FEATURES

# Threads per block (a multiple of 32: 8-bit moments take a warp per quantization block; their launches their own
# number), blocks per SM the grid-stride loop over chunks is sized for, and elements per chunk: each kind's best of
# adam-gpu tune on an H200 (docs/benchmarks.md, "Launch configurations").
THREADS_PER_BLOCK = 512
QUANTIZED_THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 16
CHUNK = 16384


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernel is launched: ``chunk`` elements per chunk (a multiple of 8; of 256 for 8-bit moments),
    ``threads_per_block`` (a multiple of 32, at most 1024: 8-bit moments take a warp per 256 elements), and a
    grid of ``blocks_per_sm`` blocks per SM (fewer when there are fewer chunks) striding over the chunks.
    The defaults are the constants above (for launches of 8-bit moments, QUANTIZED_THREADS_PER_BLOCK)."""

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


# The kernel's parameters in their C layout (native sizes and alignment, as the compiler lays out arguments):
# the struct code of each C type (a pointer: an address), and each parameter's offset in the packed buffer.
_STRUCT_CODES = {"int": "i", "long long": "q", "float": "f"}
_CODES = "".join("P" if p.ctype.endswith("*") else _STRUCT_CODES[p.ctype] for p in CUDA_PARAMETERS)
PARAMETER_LAYOUT = struct.Struct("@" + _CODES)
PARAMETER_OFFSETS = tuple(struct.calcsize(f"@{_CODES[:k]}0{_CODES[k]}") for k in range(len(_CODES)))
# The driver's launch (tests replace it with one that reads the packed parameters back).
launch_kernel = cuda_driver.launchKernel

# `with launch_config(LaunchConfig(...)):` launches with that configuration instead of the defaults.
launch_config: Override[LaunchConfig] = Override("adam_gpu.backends.cupy.launch_config")


@functools.cache  # (built once: its validation is a few microseconds of every step)
def default_launch_config(device: torch.device, quantized: bool = False) -> LaunchConfig:
    """The constants (``quantized``: for a launch of 8-bit moments; the chunk is the same, as one step's launches
    share their tables' chunking)."""
    return LaunchConfig(threads_per_block=QUANTIZED_THREADS_PER_BLOCK) if quantized else LaunchConfig()


def current_launch_config(device: torch.device, quantized: bool = False) -> LaunchConfig:
    """What a launch on ``device`` uses now: the active ``launch_config(...)`` (for every launch), else the
    defaults (``quantized``: of 8-bit moments)."""
    return launch_config.get() or default_launch_config(device, quantized)


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
def _function(device_index: int, name_expression: str) -> cupy.cuda.Function:
    """Compile (NVRTC) and load one specialization for one device (its ``ptr`` is the CUfunction to launch)."""
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(
            code=cuda_source.source(), options=cuda_source.compile_options(), name_expressions=[name_expression]
        )
        return module.get_function(name_expression).kernel  # (loaded for this device; holds its module)


class _ParameterBuffer(threading.local):
    """Each thread's buffer of packed kernel parameters and the array of their addresses the driver reads; the
    driver copies the values when the launch is queued, so the next launch may overwrite them."""

    def __init__(self) -> None:
        self.values = ctypes.create_string_buffer(PARAMETER_LAYOUT.size)
        base = ctypes.addressof(self.values)
        self.addresses = (ctypes.c_void_p * len(PARAMETER_OFFSETS))(*(base + o for o in PARAMETER_OFFSETS))
        self.addresses_pointer = ctypes.addressof(self.addresses)
        self.devices_with_context: set[int] = set()


_buffer = _ParameterBuffer()


def _ensure_context(device_index: int) -> None:
    """Make the device's CUDA context current on this thread before its first driver launch here (a runtime call
    does it, as CuPy's own launches do: a thread that has only ever used the runtime may have none yet)."""
    if device_index not in _buffer.devices_with_context:
        cuda_runtime.memGetInfo()
        _buffer.devices_with_context.add(device_index)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def adam_step(
    tensors: StepTensors, steps: list[float] | None, hp: AdamHyperparameters, device_inputs: DeviceInputs | None = None
) -> None:
    device_index = tensors.device.index if tensors.device.index is not None else torch.cuda.current_device()
    configs = current_launch_config(tensors.device), current_launch_config(tensors.device, quantized=True)
    stream = torch.cuda.current_stream(device_index).cuda_stream

    def launch(request: cuda_source.KernelLaunch) -> None:
        config = configs[request.quantized]
        grid = config.grid(request.table.n_chunks, _multiprocessors(device_index))
        function = _function(device_index, request.name_expression).ptr
        PARAMETER_LAYOUT.pack_into(_buffer.values, 0, *request.arguments())
        _ensure_context(device_index)
        launch_kernel(function, grid, 1, 1, config.threads_per_block, 1, 1, 0, stream, _buffer.addresses_pointer, 0)

    unused = unused_values(torch.device("cuda", device_index))
    with _on_device(device_index):
        cuda_source.for_each_launch(tensors, steps, hp, configs[0].chunk, device_inputs, unused, launch)


def _on_device(device_index: int) -> contextlib.AbstractContextManager:
    """The device current for the launches (its context is the one the driver launches in)."""
    if torch.cuda.current_device() == device_index:
        return contextlib.nullcontext()
    return torch.cuda.device(device_index)
