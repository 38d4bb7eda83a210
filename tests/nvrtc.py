"""A minimal ctypes binding of NVRTC (the compiler CuPy uses), to compile the CUDA C kernel without a GPU.

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (test extra) or a CUDA toolkit; ``load()`` returns
None with the reason when neither is present.
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass
from pathlib import Path

_CANDIDATES = ("cu13/lib/libnvrtc.so.13", "cuda_nvrtc/lib/libnvrtc.so.12")
_SYSTEM = ("/usr/local/cuda/lib64/libnvrtc.so",)


@dataclass
class Compiled:
    log: str
    ptx: str
    cubin: bytes
    lowered_names: dict[str, str]  # name expression -> mangled kernel name


@dataclass
class ResourceUsage:
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


def _library_paths() -> list[str]:
    paths = []
    try:
        import nvidia

        for root in map(Path, nvidia.__path__):
            paths += [str(root / candidate) for candidate in _CANDIDATES if (root / candidate).is_file()]
    except ImportError:
        pass
    return paths + [path for path in _SYSTEM if Path(path).is_file()]


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str]:
    """(the NVRTC library, its path) or (None, why it is missing)."""
    for path in _library_paths():
        return ctypes.CDLL(path), path
    return None, "no NVRTC: install the test extra (nvidia-cuda-nvrtc) or a CUDA toolkit"


def _check(library: ctypes.CDLL, result: int, what: str, log: str = "") -> None:
    if result != 0:
        library.nvrtcGetErrorString.restype = ctypes.c_char_p
        message = library.nvrtcGetErrorString(result).decode()
        raise RuntimeError(f"{what}: {message}\n{log}")


def version() -> tuple[int, int]:
    library, _ = load()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(library, library.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def supported_archs() -> list[int]:
    library, _ = load()
    count = ctypes.c_int()
    _check(library, library.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
    archs = (ctypes.c_int * count.value)()
    _check(library, library.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
    return list(archs)


def compile_program(source: str, name_expressions: list[str], options: list[str]) -> Compiled:
    """Compile ``source`` with every name expression instantiated; raise with NVRTC's log on failure."""
    library, _ = load()
    program = ctypes.c_void_p()
    _check(
        library,
        library.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"adam_cuda.cu", 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        for name in name_expressions:
            _check(library, library.nvrtcAddNameExpression(program, name.encode()), "nvrtcAddNameExpression")
        encoded = [option.encode() for option in options]
        result = library.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        log = _read(library, program, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog").decode(errors="replace")
        _check(library, result, "nvrtcCompileProgram", log)
        ptx = _read(library, program, "nvrtcGetPTXSize", "nvrtcGetPTX").decode(errors="replace")
        cubin = _read(library, program, "nvrtcGetCUBINSize", "nvrtcGetCUBIN")
        lowered = {}
        for name in name_expressions:
            mangled = ctypes.c_char_p()
            _check(
                library,
                library.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(mangled)),
                "nvrtcGetLoweredName",
            )
            lowered[name] = mangled.value.decode()
        return Compiled(log, ptx.rstrip("\0"), cubin, lowered)
    finally:
        library.nvrtcDestroyProgram(ctypes.byref(program))


def _read(library: ctypes.CDLL, program: ctypes.c_void_p, size_function: str, read_function: str) -> bytes:
    size = ctypes.c_size_t()
    if getattr(library, size_function)(program, ctypes.byref(size)) != 0 or size.value == 0:
        return b""
    buffer = ctypes.create_string_buffer(size.value)
    getattr(library, read_function)(program, buffer)
    return buffer.raw


_FUNCTION = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Compiling entry function '(\S+)'|Used (\d+) registers")


def resource_usage(log: str) -> dict[str, ResourceUsage]:
    """Per mangled kernel name, from ptxas' verbose report (``--ptxas-options=-v``) in NVRTC's log."""
    frames: dict[str, tuple[int, int, int]] = {}
    current = None
    for line in log.splitlines():
        if match := _FUNCTION.search(line):
            current = match.group(1)
        elif (match := _FRAME.search(line)) and current:
            frames[current] = tuple(int(value) for value in match.groups())
    registers: dict[str, int] = {}
    entry = None
    for match in _USED.finditer(log):
        if match.group(1):
            entry = match.group(1)
        elif entry:
            registers[entry] = int(match.group(2))
            entry = None
    return {name: ResourceUsage(registers[name], *frames.get(name, (0, 0, 0))) for name in registers}
