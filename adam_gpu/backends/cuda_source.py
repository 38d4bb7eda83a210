"""The CUDA C kernel ``kernels/adam_cuda.cu`` as the launchers see it, without importing CuPy:
its source, the name expression of each specialization, the NVRTC options, and the launch loop.
Shared by the ``cupy`` backend, the NVRTC compile tests and the host-execution tests,
so all three use the same specializations, options and arguments."""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from adam_gpu.backends import tensor_table
from adam_gpu.backends.tensor_table import TensorTable
from adam_gpu.device_inputs import DeviceInputs
from adam_gpu.hyperparameters import AdamHyperparameters, StepScalars
from adam_gpu.quantization import BLOCK as QUANT_BLOCK
from adam_gpu.quantization import code_maps_on
from adam_gpu.step_tensors import KERNEL_DTYPES, StepTensors

SOURCE_NAME = "adam_cuda.cu"
# uint8 is the code type of 8-bit moments (the kernel quantizes when the moment type is unsigned char).
CUDA_TYPES = {
    torch.float32: "float",
    torch.float16: "__half",
    torch.bfloat16: "__nv_bfloat16",
    torch.uint8: "unsigned char",
}
# Weight-decay modes of the kernel (kNoWeightDecay, kL2, kDecoupled).
NO_WEIGHT_DECAY, L2, DECOUPLED = 0, 1, 2
# C++17 for `constexpr` and `alignas` in templates; nothing that changes the math (no fast-math: IEEE
# division and sqrt, as torch), so GPU and host builds agree.
NVRTC_OPTIONS = ("--std=c++17",)


class KernelLaunch(NamedTuple):
    """One launch of one specialization over one tensor table."""

    name_expression: str
    table: TensorTable
    chunk: int  # elements per chunk: a multiple of 8, so chunks start on 16-byte boundaries
    scalars: StepScalars
    device_scalars: int  # address of DeviceInputs.values (or of any 3 floats when both flags are off)
    code_maps: tuple[int, int]  # addresses of the 8-bit code maps (fp32 [256]: signed, unsigned)
    device_step: bool
    grad_scaling: bool

    def arguments(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
        """The kernel's arguments in order, as (addresses, integers, floats): the table's three tensors,
        device_scalars and the two code maps; n_tensors, n_chunks, chunk, device_step, grad_scaling; the
        StepScalars."""
        table = self.table
        addresses = (table.pointers.data_ptr(), table.numels.data_ptr(), table.chunk_offsets.data_ptr())
        integers = (table.n_tensors, table.n_chunks, self.chunk, int(self.device_step), int(self.grad_scaling))
        return (*addresses, self.device_scalars, *self.code_maps), integers, tuple(self.scalars)


Launch = Callable[[KernelLaunch], None]


@functools.cache
def source() -> str:
    return (importlib.resources.files("adam_gpu.kernels") / SOURCE_NAME).read_text()


def source_path() -> Path:
    return Path(str(importlib.resources.files("adam_gpu.kernels") / SOURCE_NAME))


def weight_decay_mode(hp: AdamHyperparameters) -> int:
    if hp.weight_decay == 0:
        return NO_WEIGHT_DECAY
    return DECOUPLED if hp.decoupled else L2


def name_expression(
    param_dtype: torch.dtype, state_dtype: torch.dtype, weight_decay: int, amsgrad: bool, maximize: bool, master: int
) -> str:
    """The instantiation NVRTC compiles, e.g. ``adam_gpu::adam_step<__nv_bfloat16, float, 2, true, false, 0>``."""
    flags = ", ".join(str(flag).lower() for flag in (amsgrad, maximize))
    types = f"{CUDA_TYPES[param_dtype]}, {CUDA_TYPES[state_dtype]}"
    return f"adam_gpu::adam_step<{types}, {weight_decay}, {flags}, {master}>"


# Master modes each param dtype has (step_tensors.MASTER_MODES): none for fp32; fp32 copies for 16-bit
# params; the lean remainder for bf16 only.
MASTER_MODES_OF = {torch.float32: (0,), torch.float16: (0, 1), torch.bfloat16: (0, 1, 2)}


def all_name_expressions() -> list[str]:
    """Every specialization: param dtype x moments (param dtype, fp32 or bf16) x master mode x decay mode x
    amsgrad x maximize."""
    policies = sorted({(p, s) for p in KERNEL_DTYPES for s in (p, torch.float32, torch.bfloat16, torch.uint8)}, key=str)
    return [
        name_expression(param, state, decay, amsgrad, maximize, master)
        for (param, state), decay, amsgrad, maximize in itertools.product(
            policies, (NO_WEIGHT_DECAY, L2, DECOUPLED), (False, True), (False, True)
        )
        for master in MASTER_MODES_OF[param]
        if not (amsgrad and state == torch.uint8)  # 8-bit moments come without amsgrad
    ]


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
    ``unused_scalars`` (3 floats on the device) stands in for ``device_inputs.values`` when there are none."""
    if chunk % 8:
        raise ValueError(f"chunk must be a multiple of 8 elements (16 bytes of 16-bit params), got {chunk}")
    if tensors.features and chunk % QUANT_BLOCK:
        raise ValueError(f"8-bit moments need a chunk that is a multiple of {QUANT_BLOCK} elements, got {chunk}")
    code_maps = tuple(m.data_ptr() for m in code_maps_on(tensors.device))
    decay = weight_decay_mode(hp)
    device_steps = device_inputs.steps if device_inputs else None
    values = device_inputs.values if device_inputs else unused_scalars
    grad_scaling = bool(device_inputs and device_inputs.grad_scaling)
    with tensor_table.launch_groups(tensors, steps, hp, chunk, device_steps) as groups:
        for group in groups:
            name = name_expression(
                group.param_dtype, group.state_dtype, decay, hp.amsgrad, hp.maximize, group.master_mode
            )
            launch(
                KernelLaunch(
                    name,
                    group.table,
                    chunk,
                    group.scalars,
                    values.data_ptr(),
                    code_maps,
                    device_steps is not None,
                    grad_scaling,
                )
            )
