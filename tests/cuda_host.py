"""Host execution of ``kernels/adam_cuda.cu``: the same source built with g++ and tests/cuda_host_shim.h,
run thread by thread through ctypes, as a backend (the ``adam_gpu.backends`` protocol) that the shared
correctness tests take like any other.

It checks the kernel's arithmetic, indexing (vector packs, alignment fallback, grid-stride loop, tail),
rounding and the launcher's specialization and argument choice. It cannot check what only a GPU shows:
races, the memory model, launch limits, register pressure and speed (tests marked ``gpu`` do that).
Launches rotate over odd grids (blocks x threads), so the grid-stride loop sees strides that divide
nothing."""

from __future__ import annotations

import ctypes
import functools
import itertools
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from adam_gpu.backends import cuda_source
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.step_tensors import KERNEL_DTYPES, StepTensors

NAME = "cuda-host"
GRIDS = [(1, 1), (3, 32), (7, 5)]
_next_grid = itertools.cycle(GRIDS).__next__
_SHIM = Path(__file__).with_name("cuda_host_shim.h")

_DRIVER_HEAD = """\
#include "cuda_host_shim.h"
#include "{source}"

// Run every (block, thread) of a grid in turn; P and S are deduced from the kernel's signature.
template <typename P, typename S>
static void run_grid(void (*kernel)(P*, const P*, S*, S*, S*, long long, float, float, float, float, float, float,
                                    float),
                     unsigned grid, unsigned block, void* p, void* g, void* m, void* v, void* v_max, long long n,
                     const float* s) {{
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {{
    for (unsigned t = 0; t < block; ++t) {{
      blockIdx.x = b;
      threadIdx.x = t;
      kernel(static_cast<P*>(p), static_cast<const P*>(g), static_cast<S*>(m), static_cast<S*>(v),
             static_cast<S*>(v_max), n, s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    }}
  }}
}}
"""
_DRIVER_ENTRY = """
extern "C" void launch_{index}(unsigned grid, unsigned block, void* p, void* g, void* m, void* v, void* v_max,
                              long long n, const float* s) {{
  run_grid(&{name}, grid, block, p, g, m, v, v_max, n, s);
}}
"""


@functools.cache
def _library() -> dict[str, ctypes._CFuncPtr]:
    """Build every specialization into one shared library (once per process); name expression -> entry."""
    names = cuda_source.all_name_expressions()
    build = Path(tempfile.mkdtemp(prefix="adam-gpu-host-"))
    driver = _DRIVER_HEAD.format(source=cuda_source.source_path()) + "".join(
        _DRIVER_ENTRY.format(index=index, name=name) for index, name in enumerate(names)
    )
    (build / "driver.cpp").write_text(driver)
    command = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{_SHIM.parent}", "driver.cpp", "-o", "kernels.so"]
    subprocess.run(command, cwd=build, check=True, capture_output=True, text=True)
    library = ctypes.CDLL(str(build / "kernels.so"))
    entries = {}
    for index, name in enumerate(names):
        entry = getattr(library, f"launch_{index}")
        entry.argtypes = [ctypes.c_uint, ctypes.c_uint, *[ctypes.c_void_p] * 5, ctypes.c_longlong, ctypes.c_void_p]
        entry.restype = None
        entries[name] = entry
    return entries


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"the CUDA C kernel stores float32, float16 and bfloat16, not {dtype}"
    if device.type != "cpu":
        return "host execution runs CPU tensors"
    if shutil.which("g++") is None:
        return "g++ is not installed"
    return None


def _launch(request: cuda_source.KernelLaunch) -> None:
    grid, block = _next_grid()
    scalars = (ctypes.c_float * len(request.scalars))(*request.scalars)
    entry = _library()[request.name_expression]
    entry(grid, block, *request.pointers, request.n_elements, ctypes.cast(scalars, ctypes.c_void_p))


def adam_step(tensors: StepTensors, steps: list[float], hp: AdamHyperparameters) -> None:
    cuda_source.for_each_launch(tensors, steps, hp, _launch)
