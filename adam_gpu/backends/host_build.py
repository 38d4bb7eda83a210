"""Building kernels/adam_cuda.cu for the host with the system C++ compiler, and calling it through ctypes: shared by
the ``cpu`` backend (adam_gpu/backends/cpu.py) and the tests' emulated GPU build (tests/cuda_host.py).

A build is a shared library made from generated C++ text that includes the kernel files (kernels/: adam_cuda.cu with
kernel_abi's definitions before it, as NVRTC compiles it, cuda_host_shim.h, adam_cpu.cpp). It is cached on disk in a
folder named by the hash of everything it reads: the texts, the command and the compiler's identity (its
``--version`` and, since ``-march=native`` builds for the machine, the CPU's model and flags). Two processes that
build the same library at once each compile into a folder of their own and rename the result into place, so a
loader never sees a partial file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from adam_gpu.backends import cuda_source
from adam_gpu.kernel_abi import CUDA_PARAMETERS

# The folder the builds are kept in (default: $XDG_CACHE_HOME/adam-gpu/host-build, else ~/.cache/...).
BUILD_CACHE_ENV = "ADAM_GPU_BUILD_CACHE"
COMPILER_ENV = "CXX"  # the C++ compiler (default: c++, else g++, on the PATH)
# Set (to 1), builds use AddressSanitizer: a read or write outside a tensor stops the process with a report. The
# process must load ASan's runtime first (tests/test_cuda_host_sanitized.py says how).
SANITIZE_ENV = "ADAM_GPU_HOST_ASAN"
SANITIZE_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer", "-g")
LIBRARY = "library.so"
# The kernel files a build includes, copied into the build folder (adam_cuda.cu with kernel_abi's definitions).
KERNEL_FILES = ("cuda_host_shim.h", "adam_cpu.cpp")

# ctypes' type of each kernel parameter (kernel_abi.CUDA_PARAMETERS): pointers as addresses.
_CTYPES = {"int": ctypes.c_int, "long long": ctypes.c_longlong, "float": ctypes.c_float}
PARAMETER_CTYPES = tuple(ctypes.c_void_p if p.ctype.endswith("*") else _CTYPES[p.ctype] for p in CUDA_PARAMETERS)


class BuildError(RuntimeError):
    """The compiler is missing or failed; the message says which, with its output."""


def compiler() -> str | None:
    """The C++ compiler's path: $CXX, else c++ or g++ on the PATH; None if there is none."""
    named = os.environ.get(COMPILER_ENV)
    return shutil.which(named) if named else shutil.which("c++") or shutil.which("g++")


def unavailable_reason() -> str | None:
    """Why nothing can be built here (no compiler), or None."""
    if compiler() is None:
        named = os.environ.get(COMPILER_ENV)
        return f"the C++ compiler {named!r} ($CXX) is not found" if named else "no C++ compiler (c++ or g++) found"
    return None


@functools.cache
def _identity(path: str) -> str:
    """What makes a build specific to this compiler and machine: its path and version, the CPU's model and flags."""
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu += "".join(line for line in cpuinfo if line.startswith(("model name", "flags")))[:4000]
    except OSError:
        cpu += platform.processor()
    return "\n".join([path, version, cpu])


def cache_root() -> Path:
    if os.environ.get(BUILD_CACHE_ENV):
        return Path(os.environ[BUILD_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adam-gpu" / "host-build"


def sanitizing() -> bool:
    return bool(os.environ.get(SANITIZE_ENV))


def kernel_sources() -> dict[str, str]:
    """The kernel files by name, as a build folder holds them."""
    kernels = importlib.resources.files("adam_gpu.kernels")
    return {
        cuda_source.SOURCE_NAME: cuda_source.source(),
        **{name: (kernels / name).read_text() for name in KERNEL_FILES},
    }


def build(driver: str, flags: Sequence[str]) -> Path:
    """The shared library compiled from ``driver`` (C++ that includes the kernel files) with ``flags``: from the
    cache where it is there, else built now (and kept). Raises BuildError when there is no compiler or it fails."""
    path = compiler()
    if path is None:
        raise BuildError(unavailable_reason())
    flags = [*flags, *(SANITIZE_FLAGS if sanitizing() else ())]
    command = [path, "-shared", "-fPIC", *flags, "-I.", "driver.cpp", "-o"]
    sources = {"driver.cpp": driver, **kernel_sources()}
    key = hashlib.sha256("\0".join([*command, _identity(path), *sources.values()]).encode()).hexdigest()[:24]
    folder = cache_root() / key
    library = folder / LIBRARY
    if library.is_file():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:  # (this process's own: another may be building too)
        for name, text in sources.items():
            Path(work, name).write_text(text)
        result = subprocess.run([*command, LIBRARY], cwd=work, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        os.replace(Path(work, LIBRARY), library)
    return library


def entry(library: ctypes.CDLL, name: str, leading: Sequence[type] = ()) -> ctypes._CFuncPtr:
    """The library's function ``name`` taking ``leading`` arguments, then the kernel's (kernel_abi.CUDA_PARAMETERS)."""
    function = getattr(library, name)
    function.argtypes = [*leading, *PARAMETER_CTYPES]
    function.restype = None
    return function


def ctypes_values(arguments: Sequence[int | float]) -> list[int | float]:
    """The kernel's arguments (in CUDA_PARAMETERS's order) as ctypes takes them: numpy scalars made Python numbers."""
    return [float(a) if kind is ctypes.c_float else int(a) for kind, a in zip(PARAMETER_CTYPES, arguments, strict=True)]
