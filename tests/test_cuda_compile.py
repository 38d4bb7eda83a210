"""The CUDA C kernel compiled by NVRTC, without a GPU, for every arch the backend may meet.

Every specialization is compiled with exactly the options the ``cupy`` backend uses at run time, plus
``-arch=sm_XX --ptxas-options=-v``: NVRTC compiles to SASS itself, so the register report comes from
its own ptxas (NVRTC 13.5's PTX is too new for the toolkit's ptxas 13.0). Asserted: it compiles
without warnings, every name expression resolves, and no specialization spills or uses a stack frame.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from nvrtc import Compiled, compile_program, load, resource_usage, supported_archs, version
from support import REPORT

from adam_gpu.backends import cuda_source

# CUDA 13's NVRTC has dropped compute_70; 100 and 120 (Blackwell) where the NVRTC knows them.
ARCHS = [75, 80, 90, 100, 120]
MAX_REGISTERS = 255

_library, _reason = load()
pytestmark = pytest.mark.skipif(_library is None, reason=_reason)


@pytest.fixture(scope="module", params=ARCHS, ids=lambda arch: f"sm_{arch}")
def compiled(request):
    arch = request.param
    if arch not in supported_archs():
        pytest.skip(f"NVRTC {version()} does not know sm_{arch}")
    names = cuda_source.all_name_expressions()
    options = [*cuda_source.compile_options(), f"-arch=sm_{arch}", "--ptxas-options=-v"]
    return arch, names, _compile_on_every_core(names, options)


def _compile_on_every_core(names: list[str], options: list[str]) -> Compiled:
    """One program per core, each with a share of the name expressions, merged: NVRTC compiles in parallel
    from threads (ctypes releases the GIL), 2.0x faster on CI's 2 cores, where this file took 4 minutes."""
    parts = max(1, min(len(names), os.cpu_count() or 1))
    with ThreadPoolExecutor(parts) as pool:
        programs = list(pool.map(lambda share: compile_program(cuda_source.source(), share, options),
                                 [names[part::parts] for part in range(parts)]))  # fmt: skip
    return Compiled(
        log="\n".join(program.log for program in programs),
        ptx="".join(program.ptx for program in programs),
        cubin=b"".join(program.cubin for program in programs),
        lowered_names={name: mangled for program in programs for name, mangled in program.lowered_names.items()},
    )


def test_headers_are_found():
    assert cuda_source.include_dirs(), "cuda_fp16.h/cuda_bf16.h not found: install the test extra"


def test_every_specialization_compiles_cleanly(compiled):
    arch, names, program = compiled
    assert "warning" not in program.log.lower(), program.log
    assert set(program.lowered_names) == set(names)
    assert len(program.cubin) > 0
    for name, mangled in program.lowered_names.items():
        assert mangled.startswith("_ZN8adam_gpu9adam_step"), name


def test_no_specialization_spills(compiled):
    arch, names, program = compiled
    usage = resource_usage(program.log)
    registers_by_policy: dict[str, list[int]] = {}
    for name in names:
        report = usage[program.lowered_names[name]]
        assert report.spill_store_bytes == report.spill_load_bytes == 0, f"{name} spills on sm_{arch}: {report}"
        assert report.stack_bytes == 0, f"{name} uses a stack frame on sm_{arch}: {report}"
        assert report.registers <= MAX_REGISTERS
        policy = "/".join(name.split("<")[1].split(", ")[:2])  # param type / moment type
        registers_by_policy.setdefault(policy, []).append(report.registers)
    lines = REPORT.setdefault(
        "CUDA C kernel: registers per arch and param/moment types (all options and master modes), no spills", []
    )
    lines += [
        f"sm_{arch:<4} {policy:<28} {min(counts)}-{max(counts)} registers"
        for policy, counts in sorted(registers_by_policy.items())
    ]


def _entries(ptx: str) -> dict[str, str]:
    """The PTX of each kernel entry, by its mangled name."""
    parts = re.split(r"^\.(?:weak|visible) \.entry ", ptx, flags=re.MULTILINE)[1:]
    return {part.split("(", 1)[0]: part for part in parts}


def test_memory_accesses_are_global_and_vectorized(compiled):
    """Addresses come from the tensor table, which the compiler cannot trace: without assume_global it emits
    generic loads and stores (ld.f32, which first test the address space). The elementwise specializations
    load and store 16-byte packs (ld.global.v4) where aligned; 8-bit moments go a warp per block, one element
    a lane (coalesced, scalar)."""
    arch, names, program = compiled
    entries = _entries(program.ptx)
    for name in names:
        ptx = entries[program.lowered_names[name]]
        generic = sorted(set(re.findall(r"\b(?:ld|st)\.(?!global|param|shared|local|const)[\w.]+", ptx)))
        assert not generic, f"{name} on sm_{arch}: generic memory accesses {generic}"
        if "unsigned char" not in name:
            for access in ("ld", "st"):
                assert re.search(rf"\b{access}\.global\.v[24]\.", ptx), f"{name} on sm_{arch}: no vector {access}"
