"""What the launchers and both kernels agree on, written once: the tensor table's columns, the layout of the
device scalars, the kernels' mode numbers, and the CUDA C kernel's parameters in order.

The Triton kernel (kernels/adam_triton.py) reads these names as constexpr globals; the CUDA C kernel
(kernels/adam_cuda.cu) gets them as the definitions ``cuda_definitions()`` generates, which
adam_gpu/backends/cuda_source.py puts before the source (NVRTC and the host build compile the same text);
adam_gpu/backends/tensor_table.py builds the rows, and the CuPy launcher and the host build pack the arguments
from ``CUDA_PARAMETERS``. Nothing here imports torch or a GPU library.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class Column(IntEnum):
    """The columns of a tensor table's row: one int64 address per tensor of a param (0 where it has none)."""

    PARAM = 0
    GRAD = 1
    EXP_AVG = 2
    EXP_AVG_SQ = 3
    MAX_EXP_AVG_SQ = 4  # exp_avg_sq's address again without amsgrad (never read then)
    STEP = 5  # the float32 step count on the device (capturable mode)
    MASTER = 6  # the fp32 master copy or the lean master's int16 remainder
    EXP_AVG_ABSMAX = 7  # 8-bit moments: one fp32 absmax per quantization block
    EXP_AVG_SQ_ABSMAX = 8


ROW_WIDTH = len(Column)


class DeviceScalar(IntEnum):
    """The float32 values the kernels read from ``DeviceInputs.values`` (adam_gpu/device_inputs.py)."""

    LR = 0
    GRAD_MULTIPLIER = 1  # 1 / AMP grad scale x clip coefficient
    FOUND_INF = 2  # non-zero: the step writes nothing


DEVICE_SCALARS = len(DeviceScalar)


class WeightDecay(IntEnum):
    """None, L2 added to the gradient (Adam), decoupled from the moments (AdamW)."""

    NO_WEIGHT_DECAY = 0
    L2 = 1
    DECOUPLED = 2


def weight_decay_mode(weight_decay: float, decoupled: bool) -> int:
    """The WeightDecay of a step (as a plain int, what the launchers pass)."""
    if weight_decay == 0:
        return WeightDecay.NO_WEIGHT_DECAY.value
    return (WeightDecay.DECOUPLED if decoupled else WeightDecay.L2).value


class Master(IntEnum):
    """The param itself is the value; an fp32 master copy is (the param is its rounding); or the bf16 param
    plus an int16 remainder reconstruct the fp32 master exactly (step_tensors.MASTER_MODES: by the master's dtype)."""

    NO_MASTER = 0
    FP32_MASTER = 1
    LEAN_MASTER = 2


class Parameter(NamedTuple):
    """One parameter of the CUDA C kernel: its name and C type (``ctype``; pointers are declared __restrict__)."""

    name: str
    ctype: str


# The CUDA C kernel's parameters, in order. Pointers are device addresses; the last ten are
# adam_gpu.hyperparameters.StepScalars, by field name.
CUDA_PARAMETERS = (
    Parameter("pointers", "const long long*"),  # the table: int64 [T, ROW_WIDTH]
    Parameter("numels", "const long long*"),  # [T]
    Parameter("chunk_offsets", "const long long*"),  # [T + 1]
    Parameter("n_tensors", "int"),
    Parameter("n_chunks", "long long"),
    Parameter("chunk_size", "long long"),
    Parameter("device_scalars", "const float*"),  # [DEVICE_SCALARS]
    Parameter("weight_decay", "int"),  # a WeightDecay
    Parameter("maximize", "int"),
    Parameter("device_step", "int"),  # step counts and lr on the device (Column.STEP, DeviceScalar.LR)
    Parameter("grad_scaling", "int"),  # DeviceScalar.GRAD_MULTIPLIER and FOUND_INF apply
    Parameter("one_minus_beta1", "float"),
    Parameter("one_minus_beta2", "float"),
    Parameter("eps", "float"),
    Parameter("l2_weight_decay", "float"),
    Parameter("param_decay", "float"),
    Parameter("step_size", "float"),
    Parameter("bias_correction2_sqrt", "float"),
    Parameter("decoupled_weight_decay", "float"),
    Parameter("ln_beta1", "float"),
    Parameter("ln_beta2", "float"),
)
CUDA_PARAMETER_NAMES = tuple(parameter.name for parameter in CUDA_PARAMETERS)


def cuda_constant_name(name: str, suffix: str = "") -> str:
    """C++ style: EXP_AVG_SQ -> kExpAvgSq (+ suffix)."""
    return "k" + "".join(word.capitalize() for word in name.split("_")) + suffix


def _c_enum(enum: type[IntEnum], suffix: str = "") -> str:
    """An unscoped C++ enum (its names need no qualification, and an unused one draws no warning)."""
    members = ", ".join(f"{cuda_constant_name(member.name, suffix)} = {member.value}" for member in enum)
    return f"enum {enum.__name__} : int {{ {members} }};"


def _c_declaration(parameter: Parameter) -> str:
    restrict = " __restrict__" if parameter.ctype.endswith("*") else ""  # (nothing else points into these)
    return f"{parameter.ctype}{restrict} {parameter.name}"


def cuda_definitions() -> str:
    """The C++ definitions of this module's facts, to put before kernels/adam_cuda.cu: ``adam_gpu`` enums and
    constants (``kExpAvgSqColumn``, ``kRowWidth``, ``kGradMultiplier``, ``kDecoupled``, ``kLeanMaster`` ...) and
    ``ADAM_GPU_STEP_PARAMETERS``, the kernel's parameter list (``ADAM_GPU_STEP_ARGUMENTS``: their names, to pass
    them on)."""
    constants = [_c_enum(Column, "Column"), f"constexpr int kRowWidth = {ROW_WIDTH};"]
    constants += [_c_enum(enum) for enum in (DeviceScalar, WeightDecay, Master)]
    parameters = ", ".join(map(_c_declaration, CUDA_PARAMETERS))
    return "\n".join(
        [
            "// Generated by adam_gpu/kernel_abi.py (cuda_definitions): the table's columns, the device scalars, the",
            "// modes and the kernel's parameters, as the launchers use them.",
            "namespace adam_gpu {",
            *constants,
            "}  // namespace adam_gpu",
            f"#define ADAM_GPU_STEP_PARAMETERS {parameters}",
            f"#define ADAM_GPU_STEP_ARGUMENTS {', '.join(CUDA_PARAMETER_NAMES)}",
            "",
        ]
    )
