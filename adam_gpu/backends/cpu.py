"""The compiled CPU step: kernels/adam_cpu.cpp (the CUDA C kernel's math, kernels/adam_cuda.cu, in loops that the
compiler vectorizes), built at first use with the system C++ compiler (adam_gpu/backends/host_build.py: one
specialization at a time, cached on disk) and called through ctypes with the CUDA launch's table and arguments.

``backend="auto"`` takes it on CPU tensors for the steps torch's fused CPU kernel cannot take (8-bit moments,
master weights, moments in another dtype than the param: dispatch.AUTO_ORDER); docs/cpu-torch-backend.md has the
measurements. Threads: ``torch.get_num_threads()``, over chunks of CHUNK elements.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from adam_gpu.backends import cuda_source, host_build
from adam_gpu.device_inputs import DeviceInputs, unused_values
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.step_tensors import EIGHT_BIT, KERNEL_DTYPES, StepTensors

# Elements a thread takes at a time (a multiple of the 8-bit moments' 256-element block).
CHUNK = 2**16
# -O3 and vectorization that keeps IEEE results: -fno-math-errno lets sqrtf vectorize (no errno to set), and
# -fno-trapping-math lets the compiler select between both sides of a float comparison (FP exceptions are not
# looked at); -ffp-contract=off keeps a * b + c two roundings, as torch's CPU kernels and Triton's interpreter
# round, whatever the machine's FMA (the GPU builds contract into FMAs). -march=native: the build is made for this
# machine (its CPU is in the cache key). Never fast-math.
FLAGS = ("-std=c++17", "-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
         "-fopenmp")  # fmt: skip
_DRIVER = """\
#include "adam_cpu.cpp"
extern "C" void adam_step_cpu(int threads, ADAM_GPU_STEP_PARAMETERS) {{
  {name}(threads, ADAM_GPU_STEP_ARGUMENTS);
}}
"""
_CPU_STEP = "adam_gpu::adam_step_cpu"

FEATURES = frozenset({EIGHT_BIT})


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"the compiled CPU kernel stores float32, float16 and bfloat16, not {dtype}"
    if device.type != "cpu":
        return f"tensors are on {device.type}: the compiled CPU kernel runs CPU tensors"
    return host_build.unavailable_reason() or _build_failure(host_build.compiler())


# The specialization built (once per process, then from the disk cache) to learn whether the compiler found can
# build the kernel at all: one that cannot (no OpenMP, an unknown flag, missing headers) makes the backend
# unavailable, so that auto passes it over and backend="cpu" is refused with the compiler's words.
_PROBE = cuda_source.name_expression(torch.float32, torch.float32, False, 0)


@functools.cache
def _build_failure(compiler: str) -> str | None:
    try:
        _entry(_PROBE)
    except (host_build.BuildError, OSError) as error:  # (OSError: built, but the loader refuses the library)
        return f"the C++ compiler {compiler} cannot build the CPU kernel: {error}"
    return None


def cpu_name_expression(name_expression: str) -> str:
    """The CPU driver's function of a CUDA specialization: ``adam_gpu::adam_step<...>`` -> ``adam_step_cpu<...>``."""
    return name_expression.replace("adam_gpu::adam_step<", _CPU_STEP + "<", 1)


@functools.cache
def _entry(name_expression: str) -> ctypes._CFuncPtr:
    """The specialization built (or found in the cache) and loaded: (threads, kernel arguments) -> None."""
    library = ctypes.CDLL(str(host_build.build(_DRIVER.format(name=cpu_name_expression(name_expression)), FLAGS)))
    return host_build.entry(library, "adam_step_cpu", leading=(ctypes.c_int,))


def adam_step(
    tensors: StepTensors, steps: list[float] | None, hp: AdamHyperparameters, device_inputs: DeviceInputs | None = None
) -> None:
    threads = torch.get_num_threads()

    def launch(request: cuda_source.KernelLaunch) -> None:
        _entry(request.name_expression)(threads, *request.arguments())

    cuda_source.for_each_launch(tensors, steps, hp, CHUNK, device_inputs, unused_values(torch.device("cpu")), launch)
