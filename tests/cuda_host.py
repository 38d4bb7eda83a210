"""Host execution of ``kernels/adam_cuda.cu``: the same source built with g++ and kernels/cuda_host_shim.h
(adam_gpu/backends/host_build.py, as the ``cpu`` backend builds it), run through ctypes (thread by thread, or a
block's threads at once as OS threads where warps shuffle) as GPU threads would run it, as a backend (the
``adam_gpu.backends`` protocol) that the shared correctness tests take like any other.

It checks the kernel's arithmetic, indexing (vector packs, alignment fallback, grid-stride loop, tail, a warp
per quantization block), the warps' absmax reduction, rounding and the launcher's specialization and argument
choice. It cannot check what only a GPU shows: the memory model, launch limits, register pressure and speed
(tests marked ``gpu`` do that). Launches rotate over odd grids (blocks x threads; whole warps for 8-bit
moments) and use several chunk sizes, so the grid-stride loops see strides that divide nothing."""

from __future__ import annotations

import ctypes
import functools
import itertools
import shutil

import torch

from adam_gpu.backends import cuda_source, host_build
from adam_gpu.device_inputs import DeviceInputs, unused_values
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.step_tensors import EIGHT_BIT, KERNEL_DTYPES, StepTensors

GRIDS = [(1, 1), (3, 32), (7, 5)]
# 8-bit moments take a warp per quantization block: whole warps, and (64 threads) more than one a block.
GRIDS_8BIT = [(1, 32), (3, 64), (2, 96)]
# Chunk sizes (multiples of 8, as the kernel needs), chosen by the step's total element count so the same
# tensors always get the same chunk (and the same cached table): small ones put chunk boundaries, the
# table search and the pack/element split inside the tensors the tests use.
CHUNKS = [8, 40, 8192, 24]
CHUNKS_8BIT = [256, 768, 8192]  # 8-bit moments need whole quantization blocks per chunk
_next_grid = itertools.cycle(GRIDS).__next__
_next_8bit_grid = itertools.cycle(GRIDS_8BIT).__next__
# Set (to 1), the kernel is built with AddressSanitizer (host_build.SANITIZE_ENV); builds are cached in the folder
# BUILD_CACHE_ENV names (default: the user's cache, as the cpu backend's).
SANITIZE_ENV = host_build.SANITIZE_ENV
BUILD_CACHE_ENV = host_build.BUILD_CACHE_ENV
# -O1: the emulation runs one thread's kernel call at a time; what it checks is the arithmetic and indexing.
FLAGS = ("-std=c++17", "-O1", "-pthread")

_DRIVER_HEAD = """\
#include <functional>
#include <thread>
#include <vector>

#include "cuda_host_shim.h"
#include "adam_cuda.cu"

// Run a grid a block at a time: `thread` (one thread's kernel call) for each thread of a block one after another,
// or, when they shuffle within warps (`cooperative`), all at once as OS threads.
static void run_grid(bool cooperative, unsigned grid, unsigned block, const std::function<void()>& thread) {
  gridDim.x = grid;
  blockDim.x = block;
  auto run_thread = [&](unsigned b, unsigned t) {
    blockIdx.x = b;
    threadIdx.x = t;
    thread();
  };
  for (unsigned b = 0; b < grid; ++b) {
    if (!cooperative) {
      for (unsigned t = 0; t < block; ++t) run_thread(b, t);
      continue;
    }
    std::vector<HostWarp> warps((block + 31) / 32);
    host_warps = warps.data();
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) threads.emplace_back(run_thread, b, t);
    for (std::thread& thread : threads) thread.join();
    host_warps = nullptr;
  }
}
"""
# The kernel's code arithmetic alone (tests/test_quantization.py): the nearest code of each value of an array, and
# the value of each of the 256 codes.
_DRIVER_NEAREST_CODES = """
extern "C" void nearest_codes(const float* values, unsigned char* codes, long long n, int is_signed) {
  for (long long i = 0; i < n; ++i) {
    codes[i] = is_signed ? adam_gpu::nearest_code<true>(values[i]) : adam_gpu::nearest_code<false>(values[i]);
  }
}
extern "C" void code_values(float* values, int is_signed) {
  for (unsigned int code = 0; code < 256; ++code) {
    values[code] = is_signed ? adam_gpu::code_value<true>(code) : adam_gpu::code_value<false>(code);
  }
}
"""
# The shim's fp16 conversions (tests/test_host_shim.py): over arrays, and against GCC's _Float16 for every half and
# every float (the count of values that differ).
_DRIVER_CONVERSIONS = """
extern "C" void halves_to_floats(const unsigned short* halves, float* floats, long long n) {
  for (long long i = 0; i < n; ++i) floats[i] = __half2float(__half{halves[i]});
}
extern "C" void floats_to_halves(const float* floats, unsigned short* halves, long long n) {
  for (long long i = 0; i < n; ++i) halves[i] = __float2half_rn(floats[i]).bits;
}
extern "C" long long float16_mismatches() {
  long long mismatches = 0;
  for (unsigned int bits = 0; bits < 0x10000u; ++bits) {
    _Float16 half;
    const unsigned short half_bits = static_cast<unsigned short>(bits);
    memcpy(&half, &half_bits, sizeof half);
    mismatches += __float_as_uint(__half2float(__half{half_bits})) != __float_as_uint(static_cast<float>(half));
  }
  for (unsigned long long bits = 0; bits < (1ull << 32); ++bits) {
    const float value = __uint_as_float(static_cast<unsigned int>(bits));
    const _Float16 half = static_cast<_Float16>(value);
    unsigned short half_bits;
    memcpy(&half_bits, &half, sizeof half_bits);
    mismatches += __float2half_rn(value).bits != half_bits;
  }
  return mismatches;
}
"""
# The cpu backend's hardware fp16 conversions (kernels/adam_cpu.cpp's widen and narrow, with F16C) against the
# shim's, for every half and every float: the count that differ, or -1 where the build has no F16C.
_DRIVER_WIDENED = """
extern "C" long long widened_mismatches() {
#ifdef __F16C__
  long long mismatches = 0;
  static __half halves[adam_gpu::kTile];
  static float floats[adam_gpu::kTile];
  for (unsigned int first = 0; first < 0x10000u; first += adam_gpu::kTile) {
    for (int k = 0; k < adam_gpu::kTile; ++k) halves[k].bits = static_cast<unsigned short>(first + k);
    adam_gpu::widen(halves, floats, adam_gpu::kTile);
    for (int k = 0; k < adam_gpu::kTile; ++k) {
      mismatches += __float_as_uint(floats[k]) != __float_as_uint(__half2float(halves[k]));
    }
  }
  for (unsigned long long first = 0; first < (1ull << 32); first += adam_gpu::kTile) {
    for (int k = 0; k < adam_gpu::kTile; ++k) floats[k] = __uint_as_float(static_cast<unsigned int>(first + k));
    adam_gpu::narrow(floats, halves, adam_gpu::kTile);
    for (int k = 0; k < adam_gpu::kTile; ++k) mismatches += halves[k].bits != __float2half_rn(floats[k]).bits;
  }
  return mismatches;
#else
  return -1;
#endif
}
"""
# One specialization's entry: the grid, then the kernel's own parameters (kernel_abi.CUDA_PARAMETERS).
_DRIVER_ENTRY = """
extern "C" void launch_{index}(unsigned grid, unsigned block, ADAM_GPU_STEP_PARAMETERS) {{
  run_grid({cooperative}, grid, block, [&] {{ {name}(ADAM_GPU_STEP_ARGUMENTS); }});
}}
"""


@functools.cache
def _library() -> dict[str, ctypes._CFuncPtr]:
    """Build every specialization into one shared library (once per process); name expression -> entry (and
    NEAREST_CODES, CODE_VALUES -> the code arithmetic's probes)."""
    names = cuda_source.all_name_expressions()
    driver = (
        _DRIVER_HEAD
        + _DRIVER_NEAREST_CODES
        + _DRIVER_CONVERSIONS
        + "".join(
            _DRIVER_ENTRY.format(index=index, name=name, cooperative=str(_shuffles(name)).lower())
            for index, name in enumerate(names)
        )
    )
    library = ctypes.CDLL(str(host_build.build(driver, FLAGS)))
    entries = {}
    for index, name in enumerate(names):
        entries[name] = host_build.entry(library, f"launch_{index}", leading=(ctypes.c_uint, ctypes.c_uint))
    library.nearest_codes.argtypes = [
        ctypes.c_void_p,  # values
        ctypes.c_void_p,  # codes
        ctypes.c_longlong,
        ctypes.c_int,  # signed
    ]
    library.nearest_codes.restype = None
    entries[NEAREST_CODES] = library.nearest_codes
    library.code_values.argtypes = [ctypes.c_void_p, ctypes.c_int]  # values (256), signed
    library.code_values.restype = None
    entries[CODE_VALUES] = library.code_values
    entries.update(_conversion_probes(library))
    return entries


def _conversion_probes(library: ctypes.CDLL) -> dict[str, ctypes._CFuncPtr]:
    library.halves_to_floats.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
    library.floats_to_halves.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
    library.float16_mismatches.argtypes = []
    library.float16_mismatches.restype = ctypes.c_longlong
    return {name: getattr(library, name) for name in CONVERSIONS}


# (the entries of _library() that are not kernel specializations)
NEAREST_CODES = "nearest_codes"
CODE_VALUES = "code_values"
CONVERSIONS = ("halves_to_floats", "floats_to_halves", "float16_mismatches")
WIDENED_MISMATCHES = "widened_mismatches"


@functools.cache
def _vectorized_probes() -> dict[str, ctypes._CFuncPtr]:
    """The code arithmetic's probes built as the cpu backend builds its kernel (cpu.FLAGS: vectorized loops)."""
    from adam_gpu.backends import cpu

    driver = '#include "adam_cpu.cpp"\n' + _DRIVER_NEAREST_CODES + _DRIVER_CONVERSIONS + _DRIVER_WIDENED
    library = ctypes.CDLL(str(host_build.build(driver, cpu.FLAGS)))
    library.nearest_codes.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int]
    library.code_values.argtypes = [ctypes.c_void_p, ctypes.c_int]
    library.widened_mismatches.argtypes = []
    library.widened_mismatches.restype = ctypes.c_longlong
    return {NEAREST_CODES: library.nearest_codes, CODE_VALUES: library.code_values,
            WIDENED_MISMATCHES: library.widened_mismatches, **_conversion_probes(library)}  # fmt: skip


def nearest_codes(values: torch.Tensor, signed: bool, vectorized: bool = False) -> torch.Tensor:
    """The CUDA C kernel's nearest_code of each fp32 value (uint8), in the signed or the unsigned map (built as the
    cpu backend builds it where ``vectorized``)."""
    values = values.float().contiguous()
    codes = torch.empty(values.shape, dtype=torch.uint8)
    probes = _vectorized_probes() if vectorized else _library()
    probes[NEAREST_CODES](values.data_ptr(), codes.data_ptr(), values.numel(), int(signed))
    return codes


def code_values(signed: bool, vectorized: bool = False) -> torch.Tensor:
    """The CUDA C kernel's code_value of each of the 256 codes (fp32), in the signed or the unsigned map."""
    values = torch.empty(256, dtype=torch.float32)
    (_vectorized_probes() if vectorized else _library())[CODE_VALUES](values.data_ptr(), int(signed))
    return values


def halves_to_floats(halves: torch.Tensor, vectorized: bool = False) -> torch.Tensor:
    """The shim's __half2float of each half (given as int16 bits)."""
    halves = halves.contiguous()
    floats = torch.empty(halves.shape, dtype=torch.float32)
    (_vectorized_probes() if vectorized else _library())["halves_to_floats"](
        halves.data_ptr(), floats.data_ptr(), halves.numel()
    )
    return floats


def floats_to_halves(floats: torch.Tensor, vectorized: bool = False) -> torch.Tensor:
    """The shim's __float2half_rn of each fp32 value, as int16 bits."""
    floats = floats.float().contiguous()
    halves = torch.empty(floats.shape, dtype=torch.int16)
    (_vectorized_probes() if vectorized else _library())["floats_to_halves"](
        floats.data_ptr(), halves.data_ptr(), floats.numel()
    )
    return halves


def float16_mismatches(vectorized: bool = False) -> int:
    """How many of the 2^16 halves and 2^32 floats the shim converts otherwise than GCC's _Float16."""
    return int((_vectorized_probes() if vectorized else _library())["float16_mismatches"]())


def widened_mismatches() -> int | None:
    """How many halves and floats the cpu backend's F16C conversions give otherwise than the shim's; None without
    F16C (the cpu backend then converts with the shim's)."""
    mismatches = int(_vectorized_probes()[WIDENED_MISMATCHES]())
    return None if mismatches < 0 else mismatches


FEATURES = frozenset({EIGHT_BIT})


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"the CUDA C kernel stores float32, float16 and bfloat16, not {dtype}"
    if device.type != "cpu":
        return "host execution runs CPU tensors"
    if shutil.which("g++") is None:
        return "g++ is not installed"
    return host_build.unavailable_reason()


def _shuffles(name_expression: str) -> bool:
    """Whether the specialization's threads cooperate within warps: those with 8-bit moments do."""
    return cuda_source.CUDA_TYPES[torch.uint8] in name_expression


def _launch(request: cuda_source.KernelLaunch) -> None:
    grid, block = _next_8bit_grid() if _shuffles(request.name_expression) else _next_grid()
    launch_kernel_arguments(request.name_expression, grid, block, request.arguments())


def launch_kernel_arguments(name_expression: str, grid: int, block: int, arguments: tuple) -> None:
    """Run one launch given ``adam_step``'s arguments in the kernel's own parameter order, as a CUDA
    launcher passes them (tests/test_cupy_launcher.py runs the CuPy launcher's launches through this)."""
    _library()[name_expression](grid, block, *host_build.ctypes_values(arguments))


def adam_step(
    tensors: StepTensors, steps: list[float] | None, hp: AdamHyperparameters, device_inputs: DeviceInputs | None = None
) -> None:
    chunks = CHUNKS_8BIT if tensors.features else CHUNKS
    chunk = chunks[sum(p.numel() for p in tensors.params) % len(chunks)]
    cuda_source.for_each_launch(tensors, steps, hp, chunk, device_inputs, unused_values(torch.device("cpu")), _launch)
