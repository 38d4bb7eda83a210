"""What the compilers made of the two kernels for sm_90, without a GPU: memory instructions by kind and width,
shuffles, barriers, registers, stack and local memory, read from the SASS (cuobjdump) of each kernel.

    python benchmarks/kernel_report.py [--policy bf16-8bit-moments] [--decay DECOUPLED] [--branches ff]

Triton is compiled ahead of time with the launch configuration a GPU step uses (tests/test_aot_compile.py's
compile_variants, in a subprocess with TRITON_INTERPRET=0); the CUDA C source by NVRTC (tests/nvrtc.py) with the
cupy backend's options. The counts are static (instructions in the code, not executed per element): the
per-element story, with the loop trip counts, is in docs/kernels-8bit.md. For the CUDA C kernel's vector loop
(the innermost loop with 16-byte loads) the report also walks one path through it: past every slow path of a
division or square root (a short forward branch over a CALL), and at each other branch (the compiler's versions of
the loop body for the run-time modes, bounds checks) as ``--branches`` says, t(aken) or f (the default), listing
those branches with the instruction that set their predicate: docs/kernel-abi.md reads them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

# SASS opcodes worth counting: global and local memory, shared memory, shuffles, barriers.
MEMORY_OPCODE = re.compile(r"\b((?:LDG|STG|LDL|STL|LDS|STS|LD|ST|SHFL|BAR|ATOMS|ATOMG|RED)(?:\.[\w]+)*)\b")
# A SASS instruction line, not the NOPs that pad a function.
INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]{4}\*/\s+(?!NOP)[A-Z@]")
# Storage policy (tests/test_aot_compile.py's names) -> the CUDA C kernel's (param type, moment type).
POLICIES = {"bf16-8bit-moments": ("__nv_bfloat16", "unsigned char"), "fp32-8bit-moments": ("float", "unsigned char"),
            "bf16": ("__nv_bfloat16", "__nv_bfloat16"), "bf16-fp32-moments": ("__nv_bfloat16", "float"),
            "fp32": ("float", "float")}  # fmt: skip
# Weight-decay modes by name (kernels/adam_triton.py's constexprs; the CUDA C kernel takes the mode at run time).
DECAYS = ("NO_WEIGHT_DECAY", "L2", "DECOUPLED")
# A SASS instruction: its address and text (without the trailing ';').
SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"(@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(0x[0-9a-f]+)")
SLOW_PATH_MAX = 40  # instructions a branch over a CALL may skip and still count as a division's slow path


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def sass_counts(cubin: Path) -> dict[str, object]:
    """Memory opcodes (with their width suffixes) and resource usage of the kernel(s) in ``cubin``."""
    sass = subprocess.run([str(_cuobjdump()), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    cubin.with_suffix(".sass").write_text(sass)
    opcodes = collections.Counter(
        match.group(1) for line in sass.splitlines() if "/*" in line for match in [MEMORY_OPCODE.search(line)] if match
    )
    usage = subprocess.run(
        [str(_cuobjdump()), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    resources = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    instructions = sum(map(bool, map(INSTRUCTION.match, sass.splitlines())))
    return {"opcodes": dict(sorted(opcodes.items())), "resources": resources, "instructions": instructions}


def triton_report(
    policy: str, decay: str, out_dir: Path, quantized: tuple[int, int] | None = None
) -> dict[str, object]:
    """Compile the Triton variant in a fresh interpreter (the kernel module reads TRITON_INTERPRET at import), with
    an option set of this decay mode and nothing else (no amsgrad, maximize, capturable or master); ``quantized``:
    (block, warps) of a launch of 8-bit moments instead of the defaults."""
    override = ""
    if quantized:
        override = (
            "from adam_gpu.kernels import adam_triton; import adam_gpu.backends.triton as launcher; "
            f"adam_triton.QUANTIZED_BLOCK, launcher.QUANTIZED_NUM_WARPS = {quantized}; "
        )
    script = (
        "import json; from pathlib import Path; import test_aot_compile as aot; "
        + override
        + f"aot.OPTIONS['report'] = ({decay!r}, False, False, False, 'NO_MASTER'); "
        f"print(json.dumps(aot.compile_variants([aot.Variant(90, {policy!r}, 'report')], Path({str(out_dir)!r}))))"
    )
    paths = os.pathsep.join(sys.path[:2])
    env = os.environ | {"TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    env |= {"TRITON_CACHE_DIR": str(out_dir / "cache"), "PYTHONPATH": paths}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    record = json.loads(result.stdout.strip().splitlines()[-1])[0]
    if record["error"]:
        raise RuntimeError(record["error"])
    return sass_counts(out_dir / f"{record['id']}.cubin")


def _sass_instructions(sass: str) -> list[tuple[int, str]]:
    matches = map(SASS_LINE.match, sass.splitlines())
    return [(int(m.group(1), 16), m.group(2)) for m in matches if m and not m.group(2).startswith("NOP")]


def vector_loop_path(sass: str, branches: str) -> dict[str, object]:
    """The innermost loop holding 16-byte global loads: its static size, and the instructions on one path through
    it (see the module docstring), with the branches decided on the way."""
    instructions = _sass_instructions(sass)
    loops = []
    for address, text in instructions:
        branch = BRANCH.match(text)
        if branch and int(branch.group(2), 16) <= address:  # a back edge: the loop from its target to here
            body = [(a, t) for a, t in instructions if int(branch.group(2), 16) <= a <= address]
            if any("LDG.E.128" in t for _, t in body):
                loops.append(body)
    body = min(loops, key=len)
    position = {address: index for index, (address, _) in enumerate(body)}
    decisions, decided, index, path = list(branches), [], 0, 0
    while index < len(body):
        address, text = body[index]
        path += 1
        branch = BRANCH.match(text)
        if branch:
            target = int(branch.group(2), 16)
            if target <= address:
                break
            skipped = [t for a, t in body if address < a < target]
            slow_path = any("CALL" in t for t in skipped) and len(skipped) < SLOW_PATH_MAX
            if not branch.group(1) or slow_path:
                index = position.get(target, len(body))
                continue
            predicate = branch.group(1).strip().lstrip("@!")
            setter = next((t for _, t in reversed(body[:index]) if "SETP" in t and f" {predicate}," in t), "?")
            taken = (decisions.pop(0) if decisions else "f") == "t"
            decided.append(f"{text} ({setter}): {'taken' if taken else 'not taken'}")
            if taken:
                index = position.get(target, len(body))
                continue
        index += 1
    return {"static": len(body), "path": path, "branches": decided}


def cuda_report(policy: str, out_dir: Path, branches: str = "") -> dict[str, object]:
    from nvrtc import compile_program, resource_usage

    from adam_gpu.backends import cuda_source

    param, moment = POLICIES[policy]
    name = f"adam_gpu::adam_step<{param}, {moment}, false, 0>"  # (no amsgrad, no master)
    options = [*cuda_source.compile_options(), "-arch=sm_90", "--ptxas-options=-v"]
    program = compile_program(cuda_source.source(), [name], options)
    cubin = out_dir / "cuda.cubin"
    cubin.write_bytes(program.cubin)
    cubin.with_suffix(".ptx").write_text(program.ptx)
    report = sass_counts(cubin)
    report["vector loop"] = vector_loop_path(cubin.with_suffix(".sass").read_text(), branches)
    usage = resource_usage(program.log)[program.lowered_names[name]]
    report["ptxas"] = {"registers": usage.registers, "stack": usage.stack_bytes, "spills": usage.spill_store_bytes}
    return report


# One element a thread through the CUDA C source's 8-bit helpers: the instructions each costs an element, less those
# of a kernel that only loads and stores. The map-reading helpers of the source before them are measured alike.
_PROBES = """
extern "C" __global__ void copy_probe(const unsigned char* codes, const float* values, const float* map, float* out,
                                      unsigned char* out_codes, float scale) {{
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = codes[i] * scale;
  out_codes[i] = static_cast<unsigned char>(values[i]);
}}
extern "C" __global__ void decode_probe(const unsigned char* codes, const float* values, const float* map, float* out,
                                        unsigned char* out_codes, float scale) {{
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = {decode} * scale;
  out_codes[i] = static_cast<unsigned char>(values[i]);
}}
extern "C" __global__ void encode_probe(const unsigned char* codes, const float* values, const float* map, float* out,
                                        unsigned char* out_codes, float scale) {{
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = codes[i] * scale;
  out_codes[i] = {encode};
}}
"""


def helper_costs(source: str, out_dir: Path) -> dict[str, int]:
    """SASS instructions an element of each 8-bit helper of ``source`` costs (signed and unsigned map)."""
    from nvrtc import compile_program

    from adam_gpu.backends import cuda_source

    reads_maps = "code_value" not in source
    costs = {}
    for signed in ("true", "false"):
        decode = "map[codes[i]]" if reads_maps else f"adam_gpu::code_value<{signed}>(codes[i])"
        map_argument = ", map" if reads_maps else ""
        encode = f"adam_gpu::nearest_code<{signed}>(values[i]{map_argument})"
        probes = source + _PROBES.format(decode=decode, encode=encode)
        options = [*cuda_source.compile_options(), "-arch=sm_90"]
        program = compile_program(probes, [], options)
        cubin = out_dir / "probes.cubin"
        cubin.write_bytes(program.cubin)
        sass = subprocess.run([str(_cuobjdump()), "-sass", str(cubin)], capture_output=True, text=True).stdout
        counts = {}
        for function in re.split(r"\n\s+Function : ", sass)[1:]:
            name = function.split()[0]
            counts[name] = sum(map(bool, map(INSTRUCTION.match, function.splitlines())))
        kind = "signed" if signed == "true" else "unsigned"
        costs[f"decode {kind}"] = counts["decode_probe"] - counts["copy_probe"]
        costs[f"encode {kind}"] = counts["encode_probe"] - counts["copy_probe"]
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", choices=sorted(POLICIES), default="bf16-8bit-moments")
    parser.add_argument("--decay", choices=sorted(DECAYS), default="DECOUPLED", help="Triton's (CUDA C: run time)")
    parser.add_argument("--branches", default="", help="CUDA C vector loop: t/f for each branch met (default f)")
    parser.add_argument("--quantized", type=int, nargs=2, metavar=("BLOCK", "WARPS"),
                        help="Triton: launch 8-bit moments with this block and warps, not the defaults")  # fmt: skip
    parser.add_argument("--helpers-of", metavar="REVISION",
                        help="also the 8-bit helpers' costs of kernels/adam_cuda.cu at this git revision")  # fmt: skip
    parser.add_argument("--keep", type=Path, help="a folder to keep the cubins, PTX and SASS in")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out_dir = args.keep or Path(folder)
        out_dir.mkdir(parents=True, exist_ok=True)
        reports = {"triton": triton_report(args.policy, args.decay, out_dir, args.quantized),
                   "cuda": cuda_report(args.policy, out_dir, args.branches)}  # fmt: skip
        from adam_gpu.backends import cuda_source

        reports["cuda"]["helpers"] = helper_costs(cuda_source.source(), out_dir)
        if args.helpers_of:
            old = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{args.helpers_of}:kernels/adam_cuda.cu"],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            reports["cuda"][f"helpers at {args.helpers_of}"] = helper_costs(old, out_dir)
    print(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
