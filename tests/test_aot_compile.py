"""Ahead-of-time compile of the Triton kernel for sm_80 and sm_90, without a GPU.

The CPU machine cannot launch the kernel, but Triton compiles it to PTX and a cubin for any target, and the
cuobjdump bundled in the triton wheel reads registers and spills from that cubin. So a change that makes the
kernel stop compiling for a real GPU, spill, or grow past the register file fails here, not on the GPU.

conftest sets TRITON_INTERPRET=1 in this process and ``@triton.jit`` reads it at import, so the compiles run
in a fresh interpreter with TRITON_INTERPRET=0: this file run as a script (``__main__`` below) compiles every
variant in one subprocess: a subprocess costs about two seconds of imports, the first compile about one, and
each further compile 0.1-0.2 s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ARCHS = (80, 90)
# Storage policy -> (param and grad dtype, moment dtype), in Triton's signature spelling.
POLICIES: dict[str, tuple[str, str]] = {
    "fp32": ("fp32", "fp32"),
    "fp16": ("fp16", "fp16"),
    "bf16": ("bf16", "bf16"),
    "bf16-fp32-moments": ("bf16", "fp32"),
    "fp16-fp32-moments": ("fp16", "fp32"),
    "fp32-bf16-moments": ("fp32", "bf16"),
    "fp32-8bit-moments": ("fp32", "u8"),  # u8: quantized moments (uint8 codes and block absmax)
    "bf16-8bit-moments": ("bf16", "u8"),
}
# Option set -> (WEIGHT_DECAY mode name in kernels.adam_triton, AMSGRAD, MAXIMIZE, DEVICE_STEP and GRAD_SCALING).
# The capturable AMP variant is the heaviest (one more load and store, device scalars, the most live values);
# adam-plain the lightest.
# The last entry is the MASTER mode name (the lean master exists for bf16 params only).
OPTIONS: dict[str, tuple[str, bool, bool, bool, str]] = {
    "adamw-amsgrad-maximize": ("DECOUPLED", True, True, False, "NO_MASTER"),
    "adamw-amsgrad-capturable-amp": ("DECOUPLED", True, True, True, "NO_MASTER"),
    "adamw-amsgrad-fp32-master": ("DECOUPLED", True, False, False, "FP32_MASTER"),
    "adamw-amsgrad-lean-master": ("DECOUPLED", True, False, False, "LEAN_MASTER"),
    "adam-plain": ("NO_WEIGHT_DECAY", False, False, False, "NO_MASTER"),
    "adam-l2": ("L2", False, False, False, "NO_MASTER"),
}


@dataclass(frozen=True)
class Variant:
    arch: int
    policy: str
    options: str

    @property
    def id(self) -> str:
        return f"sm{self.arch}-{self.policy}-{self.options}"


# After the first (about a second) each compile takes 0.1-0.2 s, so every combination is compiled.
VARIANTS = [
    Variant(arch, policy, options)
    for arch in ARCHS
    for policy in POLICIES
    for options in OPTIONS
    if OPTIONS[options][4] != "LEAN_MASTER" or POLICIES[policy][0] == "bf16"
    if not (OPTIONS[options][1] and POLICIES[policy][1] == "u8")  # 8-bit moments come without amsgrad
]

RESOURCE_USAGE = re.compile(
    r"Function (?P<name>\w+):\s*\n\s*REG:(?P<REG>\d+) STACK:(?P<STACK>\d+) SHARED:(?P<SHARED>\d+) "
    r"LOCAL:(?P<LOCAL>\d+)"
)
# The hardware limit per thread on sm_80 and sm_90; more than this and ptxas spills.
MAX_REGISTERS = 255
MAX_STACK_BYTES = 8  # two registers spilled by ptxas's occupancy heuristic (see the test)
SCALAR_PATH_SHARED_BYTES = 1024  # layout conversions of the kernel's scalar path (see the test)


def compile_variants(variants: list[Variant], out_dir: Path) -> list[dict[str, object]]:
    """Compile each variant, writing ``<id>.ptx`` and ``<id>.cubin`` into ``out_dir``; one record per variant.

    Runs in the subprocess (TRITON_INTERPRET=0): imports triton and the kernel module only here.
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    from adam_gpu.backends.triton import default_launch_config
    from adam_gpu.kernels import adam_triton

    kernel = adam_triton.adam_step_kernel
    # The launch's tensor table (pointers, numels, chunk offsets), the tensor count, device scalars, then the scalars.
    scalars = kernel.arg_names[kernel.arg_names.index("device_scalars") + 1 : kernel.arg_names.index("PARAM_TYPE")]
    types = {
        "fp32": triton.language.float32,
        "fp16": triton.language.float16,
        "bf16": triton.language.bfloat16,
        "u8": triton.language.uint8,
    }
    records = []
    for variant in variants:
        param_dtype, moment_dtype = POLICIES[variant.policy]
        weight_decay, amsgrad, maximize, device_scalars, master = OPTIONS[variant.options]
        signature = {"pointers": "*i64", "numels": "*i64", "chunk_offsets": "*i64", "n_tensors": "i32"}
        signature |= {"device_scalars": "*fp32"}
        signature |= dict.fromkeys(scalars, "fp32")
        constexprs = {
            "PARAM_TYPE": types[param_dtype],
            "STATE_TYPE": types[moment_dtype],
            "WEIGHT_DECAY": getattr(adam_triton, weight_decay).value,
            "AMSGRAD": amsgrad,
            "MAXIMIZE": maximize,
            "MASTER": getattr(adam_triton, master).value,
            "QUANTIZED": moment_dtype == "u8",
            "DEVICE_STEP": device_scalars,
            "GRAD_SCALING": device_scalars,
        }
        # The launch configuration a step on a GPU uses for this variant (block and warps differ for 8-bit).
        config = default_launch_config(torch.device("cuda"), quantized=constexprs["QUANTIZED"])
        constexprs |= {"CHUNK": config.chunk, "BLOCK": config.block}
        signature |= dict.fromkeys(constexprs, "constexpr")
        # As a launch specializes them: every pointer argument (the table and the device scalars: torch
        # allocations) 16-byte aligned, which lets Triton vectorize the table loads (more registers than without).
        aligned = CUDABackend.parse_attr("D")
        attrs = {(kernel.arg_names.index(name),): aligned for name, kind in signature.items() if kind.startswith("*")}
        record: dict[str, object] = {"id": variant.id, "error": None}
        start = time.perf_counter()
        try:
            compiled = triton.compile(
                triton.compiler.ASTSource(kernel, signature, constexprs, attrs),
                target=GPUTarget("cuda", variant.arch, 32),
                options={"num_warps": config.num_warps},
            )
        except Exception as error:  # reported per variant, so one broken variant does not hide the others
            record["error"] = f"{type(error).__name__}: {error}"
        else:
            (out_dir / f"{variant.id}.ptx").write_text(compiled.asm["ptx"])
            (out_dir / f"{variant.id}.cubin").write_bytes(compiled.asm["cubin"])
        record["seconds"] = round(time.perf_counter() - start, 2)
        records.append(record)
    return records


def _cuobjdump() -> Path:
    triton = pytest.importorskip("triton", reason="the AOT compile needs triton (pip install 'adam-gpu[triton]')")
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not os.access(path, os.X_OK):
        pytest.skip(f"no cuobjdump bundled with triton {triton.__version__} at {path}")
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, object]]]:
    """Compile every variant in one fresh interpreter; the output folder and the records by variant id."""
    _cuobjdump()
    out_dir = tmp_path_factory.mktemp("aot")
    env = os.environ | {
        "TRITON_INTERPRET": "0",
        # Triton 3.9 warns unless fp fusion is chosen explicitly; 1 is its default, so the code is unchanged.
        "TRITON_DEFAULT_FP_FUSION": "1",
        # A fresh cache: the test measures a real compile, not a cubin left by an earlier run.
        "TRITON_CACHE_DIR": str(out_dir / "triton-cache"),
    }
    result = subprocess.run(
        [sys.executable, __file__, str(out_dir)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"compile subprocess failed:\n{result.stdout}\n{result.stderr}"
    records = json.loads((out_dir / "report.json").read_text())
    return out_dir, {record["id"]: record for record in records}


def _resource_usage(cuobjdump: Path, cubin: Path) -> dict[str, int | str]:
    output = subprocess.run(
        [str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    match = RESOURCE_USAGE.search(output)
    assert match, f"no resource usage line in cuobjdump output:\n{output}"
    return {key: value if key == "name" else int(value) for key, value in match.groupdict().items()}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda variant: variant.id)
def test_kernel_compiles_without_spills(
    variant: Variant,
    compiled: tuple[Path, dict[str, dict[str, object]]],
    record_property: Callable[[str, object], None],
) -> None:
    out_dir, records = compiled
    record = records[variant.id]
    assert record["error"] is None, f"{variant.id} failed to compile: {record['error']}"

    ptx = (out_dir / f"{variant.id}.ptx").read_text()
    assert re.search(r"\.entry\s+adam_step_kernel\(", ptx), f"{variant.id}: no adam_step_kernel entry in the PTX"
    # sm_90 compiles for sm_90a (the arch-specific features); sm_80 has none.
    assert re.search(rf"^\.target sm_{variant.arch}a?\b", ptx, re.MULTILINE), f"{variant.id}: PTX for another arch"
    # IEEE division and square root, as torch's: Triton's `/` and tl.sqrt become div.full/sqrt.approx.ftz on
    # the GPU, which the interpreter (exact numpy) never shows. (ex2.approx stays: 1 - exp(x) for x <= -1/2.)
    approximate = sorted(set(re.findall(r"\b(?:div|sqrt|rcp|rsqrt)\.(?:approx|full)[.\w]*", ptx)))
    assert not approximate, f"{variant.id}: approximate division or square root in the PTX: {approximate}"
    # Whole chunks of 16-byte aligned tensors load and store 8 or 16 bytes a thread (kernels/adam_triton.py:
    # the pointers declared aligned, the mask provably constant): without them every access is 2 or 4 bytes.
    for access in ("ld", "st"):
        assert re.search(rf"\b{access}\.global\.v[24]\.b32\b", ptx), f"{variant.id}: no vector {access}.global"

    usage = _resource_usage(_cuobjdump(), out_dir / f"{variant.id}.cubin")
    summary = f"{variant.id}: REG={usage['REG']} STACK={usage['STACK']} LOCAL={usage['LOCAL']} SHARED={usage['SHARED']}"
    # Shown with -s or -rP and in junit XML; the assertion messages below carry it into any failure.
    print(f"{summary} (compiled in {record['seconds']} s)")
    from support import REPORT  # here, not at the top: the compile subprocess runs this file without it

    REPORT.setdefault("Triton kernel: registers per variant (ahead-of-time compile, no GPU)", []).append(summary)
    for key in ("REG", "STACK", "LOCAL", "SHARED"):
        record_property(key.lower(), usage[key])

    assert usage["name"] == "adam_step_kernel", summary
    # ptxas may keep a kernel under an occupancy step (72 or 96 registers) by spilling one or two registers
    # to the stack: 8 bytes, one L1-resident load per 8 elements in the worst case (sm_80 capturable and
    # 8-bit variants since IEEE division, 2026-11-25). More than that is a real spill.
    assert usage["STACK"] <= MAX_STACK_BYTES and usage["LOCAL"] == 0, f"register spills: {summary}"
    if POLICIES[variant.policy][1] == "u8":
        # 8-bit moments: the block-wise absmax is a reduction across warps (measured: 1 KB).
        assert usage["SHARED"] <= 4096, f"the absmax reduction should need at most 4 KB: {summary}"
    else:
        # The scalar path (a chunk ending inside its tensor, or a misaligned tensor) stores one element a thread
        # from values computed four a thread: Triton converts through shared memory (1 KB, sm_90, triton 3.9).
        assert usage["SHARED"] <= SCALAR_PATH_SHARED_BYTES, f"an elementwise step needs no more: {summary}"
    assert usage["REG"] <= MAX_REGISTERS, summary


if __name__ == "__main__":
    # The compile subprocess started by the ``compiled`` fixture: python tests/test_aot_compile.py OUT_DIR.
    output = Path(sys.argv[1])
    (output / "report.json").write_text(json.dumps(compile_variants(VARIANTS, output), indent=1))
