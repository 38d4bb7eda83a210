"""The CUDA C kernel ``kernels/adam_cuda.cu`` as the launchers see it, without importing CuPy:
its source (after the definitions adam_gpu/kernel_abi.py generates), the name expression of each specialization,
the NVRTC options, the launch loop and each launch's arguments.
Shared by the ``cupy`` backend, the NVRTC compile tests and the host-execution tests,
so all three use the same source, specializations, options and arguments."""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from adam_gpu import storage_formats
from adam_gpu.backends import tensor_table
from adam_gpu.backends.tensor_table import TensorTable
from adam_gpu.device_inputs import DeviceInputs
from adam_gpu.hyperparameters import AdamHyperparameters, StepScalars
from adam_gpu.kernel_abi import CUDA_PARAMETER_NAMES, cuda_definitions, weight_decay_mode
from adam_gpu.step_tensors import KERNEL_DTYPES, StepTensors
from adam_gpu.storage_formats import MOMENT_FORMATS, SCALE_BLOCK, STORAGE_TYPES, master_modes_of, scaled_format

SOURCE_NAME = "adam_cuda.cu"
# The C type of each storage dtype (the kernel takes moments of a code type, unsigned char, as 8-bit codes).
CUDA_TYPES = {storage.dtype: storage.cuda for storage in STORAGE_TYPES}
# C++17 for `constexpr` and `alignas` in templates; nothing that changes the math (no fast-math: IEEE
# division and sqrt, as torch), so GPU and host builds agree.
NVRTC_OPTIONS = ("--std=c++17",)


class KernelLaunch(NamedTuple):
    """One launch of one specialization over one tensor table."""

    name_expression: str
    table: TensorTable
    chunk: int  # elements per chunk: a multiple of 8, so chunks start on 16-byte boundaries
    scalars: StepScalars
    device_scalars: int  # address of DeviceInputs.values (or of any DEVICE_SCALARS floats when both flags are off)
    weight_decay: int  # a kernel_abi.WeightDecay
    maximize: bool
    device_step: bool
    grad_scaling: bool
    quantized: bool = False  # 8-bit moments: a warp per quantization block

    def arguments(self) -> tuple[int | float, ...]:
        """The kernel's arguments in kernel_abi.CUDA_PARAMETERS's order: addresses, sizes and flags as ints, the
        StepScalars (by field name) as floats."""
        table = self.table
        values = {
            "pointers": table.pointers.data_ptr(),
            "numels": table.numels.data_ptr(),
            "chunk_offsets": table.chunk_offsets.data_ptr(),
            "n_tensors": table.n_tensors,
            "n_chunks": table.n_chunks,
            "chunk_size": self.chunk,
            "device_scalars": self.device_scalars,
            "weight_decay": self.weight_decay,
            "maximize": int(self.maximize),
            "device_step": int(self.device_step),
            "grad_scaling": int(self.grad_scaling),
            **self.scalars._asdict(),
        }
        return tuple(map(values.__getitem__, CUDA_PARAMETER_NAMES))


Launch = Callable[[KernelLaunch], None]


@functools.cache
def source() -> str:
    """What NVRTC and the host build compile: kernel_abi's and storage_formats' definitions, then
    kernels/adam_cuda.cu."""
    kernel = (importlib.resources.files("adam_gpu.kernels") / SOURCE_NAME).read_text()
    return cuda_definitions() + storage_formats.cuda_definitions() + kernel


def name_expression(param_dtype: torch.dtype, state_dtype: torch.dtype, amsgrad: bool, master: int) -> str:
    """The instantiation NVRTC compiles, e.g. ``adam_gpu::adam_step<__nv_bfloat16, float, true, 0>``: what changes
    the types or the memory traffic (weight decay and maximize are run-time arguments)."""
    return (
        f"adam_gpu::adam_step<{CUDA_TYPES[param_dtype]}, {CUDA_TYPES[state_dtype]}, {str(amsgrad).lower()}, {master}>"
    )


# The kernels' master modes each param dtype has (storage_formats.MASTER_MODES).
MASTER_MODES_OF = {dtype: tuple(mode.kernel for mode in master_modes_of(dtype)) for dtype in KERNEL_DTYPES}


def all_name_expressions() -> list[str]:
    """Every specialization: param dtype x moment storage (storage_formats.MOMENT_FORMATS) x master mode x amsgrad
    (where the moment format has it)."""
    policies = sorted({(p, fmt.dtype or p) for p in KERNEL_DTYPES for fmt in MOMENT_FORMATS}, key=str)
    return [
        name_expression(param, state, amsgrad, master)
        for (param, state), amsgrad in itertools.product(policies, (False, True))
        for master in map(int, MASTER_MODES_OF[param])
        if not amsgrad or _has_amsgrad(state)
    ]


def _has_amsgrad(moment_dtype: torch.dtype) -> bool:
    fmt = scaled_format(moment_dtype)
    return fmt is None or fmt.amsgrad


def include_dirs() -> list[str]:
    """Where ``cuda_fp16.h``/``cuda_bf16.h`` are: NVRTC from pip has no built-in copy. CUDA_PATH first,
    then the ``nvidia-cuda-runtime`` wheel (CUDA 13 and 12 layouts), then /usr/local/cuda."""
    candidates = []
    if os.environ.get("CUDA_PATH"):
        candidates.append(Path(os.environ["CUDA_PATH"]) / "include")
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels

        for root in map(Path, nvidia.__path__):
            candidates += [root / "cu13" / "include", root / "cuda_runtime" / "include"]
    except ImportError:
        pass
    candidates.append(Path("/usr/local/cuda/include"))
    return [str(path) for path in candidates if (path / "cuda_bf16.h").is_file()][:1]


def compile_options() -> tuple[str, ...]:
    """The NVRTC options the backend compiles with (the architecture is added by the caller)."""
    return (*NVRTC_OPTIONS, *(f"-I{path}" for path in include_dirs()))


def for_each_launch(
    tensors: StepTensors,
    steps: list[float] | None,
    hp: AdamHyperparameters,
    chunk: int,
    device_inputs: DeviceInputs | None,
    unused_scalars: torch.Tensor,
    launch: Launch,
) -> None:
    """Call ``launch`` once per launch group (see tensor_table.launch_groups): usually once per step.
    ``unused_scalars`` (DEVICE_SCALARS floats on the device) stands in for ``device_inputs.values`` when there are
    none."""
    if chunk % 8:
        raise ValueError(f"chunk must be a multiple of 8 elements (16 bytes of 16-bit params), got {chunk}")
    features = tensors.features
    if features and chunk % SCALE_BLOCK:
        needs = ", ".join(sorted(features))
        raise ValueError(f"{needs} need a chunk that is a multiple of {SCALE_BLOCK} elements, got {chunk}")
    decay = weight_decay_mode(hp.weight_decay, hp.decoupled)
    device_steps = device_inputs.steps if device_inputs else None
    values = device_inputs.values if device_inputs else unused_scalars
    grad_scaling = bool(device_inputs and device_inputs.grad_scaling)
    with tensor_table.launch_groups(tensors, steps, hp, chunk, device_steps) as groups:
        for group in groups:
            name = name_expression(group.param_dtype, group.state_dtype, hp.amsgrad, group.master_mode)
            launch(
                KernelLaunch(
                    name,
                    group.table,
                    chunk,
                    group.scalars,
                    values.data_ptr(),
                    decay,
                    hp.maximize,
                    device_steps is not None,
                    grad_scaling,
                    group.state_dtype == torch.uint8,
                )
            )
