"""The CuPy launcher (adam_gpu/backends/cupy.py) on the CPU, with the CUDA runtime faked.

Everything else the CuPy backend runs is shared with the host-execution backend (tests/cuda_host.py):
the specializations, the launch loop and KernelLaunch.arguments(). What only the CuPy launcher does is
pack the kernel's parameters into the bytes the driver copies (``cuLaunchKernel``'s ``kernelParams``: an array
of addresses, one per parameter, each of a value of the parameter's C type), and pick grid, block and stream. Here
the real ``adam_gpu.backends.cupy.adam_step`` runs on CPU tensors; a fake driver launch reads every parameter back
from those addresses as the C type ``adam_step``'s C++ parameter list in the compiled source declares (the layout
computed by ctypes, independently of the launcher's), checks the launch against CUDA's limits, then runs the
launch through the host build with the values it read, so the results are checked against the float64 reference
and torch.optim like any backend's: a parameter packed at the wrong width or place reaches the kernel wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import struct
from dataclasses import dataclass

import cuda_host
import numpy as np
import pytest
import test_8bit
import test_amp_capturable_clipping as device_inputs_tests
import torch
from support import (
    StepCase,
    assert_close_relative,
    assert_correctly_rounded,
    check_one_step,
    guarded,
    guards_intact,
    policy_id,
    seeded_generator,
)

from adam_gpu import fused_adam
from adam_gpu.backends import cuda_source

# The test extra installs CuPy (it imports without a GPU); a checkout without it skips this file.
cupy = pytest.importorskip("cupy", reason="the CuPy launcher needs cupy (pip install 'adam-gpu[test]')")
from adam_gpu.backends import cupy as cupy_backend  # noqa: E402
from adam_gpu.device_inputs import unused_values  # noqa: E402
from adam_gpu.hyperparameters import AdamHyperparameters  # noqa: E402
from adam_gpu.kernel_abi import WeightDecay  # noqa: E402
from adam_gpu.step_tensors import KERNEL_DTYPES  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        cuda_host.unavailable_reason(torch.device("cpu"), torch.float32) is not None, reason="needs g++ (host build)"
    ),
    # The shared helpers put tensors on support.DEVICE, which is the GPU there: the host build cannot read
    # them, and the real launcher runs on the GPU (tests/test_gpu.py and every backend test) instead.
    pytest.mark.skipif(torch.cuda.is_available(), reason="fakes the CUDA runtime: CPU-only machines"),
]

DEVICE_INDEX = 0
# A one-SM device: the grid is at most BLOCKS_PER_SM (8) blocks, fewer than the chunks of the larger
# launches, so the grid-stride loop over chunks is taken.
MULTIPROCESSORS = 1
MAX_BLOCKS = MULTIPROCESSORS * cupy_backend.BLOCKS_PER_SM
# CUDA's launch limits (compute capability >= 3.0): grid x, y, z; block x, y, z; threads per block.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
BLOCK_LIMITS = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024


def kernel_parameters() -> list[tuple[str, str]]:
    """(C++ type, name) of each parameter of ``adam_step`` in the source NVRTC compiles, qualifiers dropped: the
    kernel declares ADAM_GPU_STEP_PARAMETERS, which the source defines (from adam_gpu/kernel_abi.py)."""
    source = cuda_source.source()
    match = re.search(r"__global__\s+void\s+adam_step\s*\((.*?)\)\s*\{", source, re.DOTALL)
    assert match, "no __global__ adam_step in the kernel source"
    declared = match.group(1).strip()
    if declared == "ADAM_GPU_STEP_PARAMETERS":
        definition = re.search(r"^#define ADAM_GPU_STEP_PARAMETERS (.*)$", source, re.MULTILINE)
        assert definition, "ADAM_GPU_STEP_PARAMETERS is not defined before the kernel"
        declared = definition.group(1)
    parameters = []
    for declaration in declared.split(","):
        words = [w for w in declaration.replace("*", " * ").split() if w not in ("const", "__restrict__")]
        parameters.append((" ".join(words[:-1]), words[-1]))
    return parameters


def parameter_ctype(ctype: str) -> type:
    """The ctypes type of a parameter of C++ type ``ctype`` (a pointer: an address)."""
    if ctype.endswith("*"):
        return ctypes.c_void_p
    return {"int": ctypes.c_int, "long long": ctypes.c_longlong, "float": ctypes.c_float}[ctype]


def read_parameters(kernel_params: int) -> tuple:
    """The values at the addresses of a ``kernelParams`` array, each read as its parameter's C type."""
    parameters = kernel_parameters()
    addresses = (ctypes.c_void_p * len(parameters)).from_address(kernel_params)
    values = []
    for (ctype, name), address in zip(parameters, addresses, strict=True):
        assert address, f"{name}: no address in kernelParams"
        value = parameter_ctype(ctype).from_address(address).value
        if ctype.endswith("*"):  # no pointer argument is null, and none is out of a 64-bit address's range
            assert value is not None and 0 < value < 2**63, f"{name}: address {value!r}"
        values.append(value)
    return tuple(values)


class CLayout(ctypes.Structure):
    """The kernel's parameters as a C struct, laid out by ctypes: the offsets the packed buffer must have."""

    _fields_ = [(name, parameter_ctype(ctype)) for ctype, name in kernel_parameters()]


@dataclass
class Launch:
    name_expression: str
    grid: tuple
    block: tuple
    arguments: tuple

    def argument(self, name: str) -> object:
        names = [name for _, name in kernel_parameters()]
        return self.arguments[names.index(name)]


@pytest.fixture
def cupy_on_host(monkeypatch) -> list[Launch]:
    """Run the CuPy backend on CPU tensors: the CUDA runtime faked, each launch checked and then executed by
    the host build of the kernel. Yields the launches made."""
    launches: list[Launch] = []
    contexts: list[int] = []  # the devices whose context a runtime call made current before the launches

    class TorchStream:  # what torch.cuda.current_stream returns: the launcher must launch on it
        cuda_stream = 0x5EED  # the cudaStream_t
        device_index = DEVICE_INDEX

    def current_stream(device: object = None) -> object:
        assert device in (None, DEVICE_INDEX), f"torch.cuda.current_stream({device!r})"
        return TorchStream()

    def fake_unused_values(device: torch.device) -> torch.Tensor:
        assert device == torch.device("cuda", DEVICE_INDEX), f"unused scalars requested on {device}"
        return unused_values(torch.device("cpu"))

    names = cuda_source.all_name_expressions()

    class FakeFunction:  # a loaded specialization: ptr is its CUfunction
        def __init__(self, device_index: int, name_expression: str) -> None:
            assert device_index == DEVICE_INDEX
            assert name_expression in names, f"not a compiled specialization: {name_expression}"
            self.ptr = 0x1000 + names.index(name_expression)

    class FakeRuntime:
        @staticmethod
        def memGetInfo() -> tuple[int, int]:  # noqa: N802 (CuPy's name)
            contexts.append(DEVICE_INDEX)
            return 1 << 30, 1 << 30

    def launch_kernel(function, gx, gy, gz, bx, by, bz, shared_mem, stream, kernel_params, extra) -> None:
        assert isinstance(function, int) and 0x1000 <= function < 0x1000 + len(names), f"function {function!r}"
        assert shared_mem == 0 and extra == 0
        assert stream == TorchStream.cuda_stream, "not launched on torch's current stream"
        assert contexts == [DEVICE_INDEX], "launched before the device's context was made current on this thread"
        grid, block = (gx, gy, gz), (bx, by, bz)
        for dimensions, limits, what in ((grid, GRID_LIMITS, "grid"), (block, BLOCK_LIMITS, "block")):
            for size, limit in zip(dimensions, limits, strict=True):
                assert type(size) is int and 0 < size <= limit, f"{what} {dimensions}: each in [1, {limit}]"
        assert bx * by * bz <= MAX_THREADS_PER_BLOCK, f"block {block}: more than 1024 threads"
        assert gy == gz == by == bz == 1, "the kernel indexes x only"
        arguments = read_parameters(kernel_params)
        name_expression = names[function - 0x1000]
        launches.append(Launch(name_expression, (gx,), (bx,), arguments))
        cuda_host.launch_kernel_arguments(name_expression, gx, bx, arguments)

    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        return None if dtype in KERNEL_DTYPES else f"not a kernel dtype: {dtype}"

    monkeypatch.setattr(cupy_backend, "_buffer", cupy_backend._ParameterBuffer())  # (no context made current yet)
    monkeypatch.setattr(cupy_backend, "cuda_runtime", FakeRuntime)
    monkeypatch.setattr(cupy_backend, "launch_kernel", launch_kernel)
    monkeypatch.setattr(cupy_backend, "_function", FakeFunction)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: DEVICE_INDEX)
    monkeypatch.setattr(cupy_backend, "unavailable_reason", unavailable_reason)
    monkeypatch.setattr(cupy_backend, "unused_values", fake_unused_values)
    monkeypatch.setattr(cupy_backend, "_multiprocessors", lambda device_index: MULTIPROCESSORS)
    return launches


def test_the_packed_parameters_are_the_c_layout_and_read_back():
    """The launcher's buffer has each parameter at its C offset (ctypes' layout of the declared types), and distinct
    values of every parameter read back as packed, floats as their float32 rounding."""
    parameters = kernel_parameters()
    assert len(parameters) == 21 and parameters[3] == ("int", "n_tensors") and parameters[0][0] == "long long *"
    assert cupy_backend.PARAMETER_OFFSETS == tuple(getattr(CLayout, name).offset for _, name in parameters)
    assert cupy_backend.PARAMETER_LAYOUT.size == ctypes.sizeof(CLayout)
    values = tuple(
        0x7F0000001000 + 8 * k if ctype.endswith("*") else (0.1 * (k + 1) if ctype == "float" else -((k + 3) ** 5))
        for k, (ctype, _) in enumerate(parameters)
    )
    buffer = cupy_backend._ParameterBuffer()
    cupy_backend.PARAMETER_LAYOUT.pack_into(buffer.values, 0, *values)
    read = read_parameters(buffer.addresses_pointer)
    expected = tuple(float(np.float32(v)) if isinstance(v, float) else v for v in values)
    assert read == expected
    with pytest.raises(struct.error):  # an int parameter out of its 32 bits is refused, not wrapped
        cupy_backend.PARAMETER_LAYOUT.pack_into(buffer.values, 0, *values[:3], 2**31, *values[4:])


HP_OPTIONS = [
    AdamHyperparameters(1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled=True, amsgrad=True, maximize=True),
    AdamHyperparameters(1e-3, 0.8, 0.99, 1e-6, 0.05),  # Adam's L2 decay
]


@pytest.mark.parametrize("policy", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)], ids=policy_id)
@pytest.mark.parametrize("hp", HP_OPTIONS, ids=["adamw-amsgrad-maximize", "adam-l2"])
@pytest.mark.parametrize("size", [1, 4097, 278011])
def test_one_step_matches_reference_and_torch(cupy_on_host, policy, hp, size):
    param_dtype, state_dtype = policy
    case = StepCase.draw(size, seeded_generator("cupy launcher", policy, hp, size)).rounded(param_dtype, state_dtype)
    check_one_step("cupy", case, param_dtype, state_dtype, hp)
    (launch,) = cupy_on_host
    chunks = -(-size // cupy_backend.CHUNK)
    assert launch.grid == (min(chunks, MAX_BLOCKS),) and launch.block == (cupy_backend.THREADS_PER_BLOCK,)
    assert (launch.argument("n_chunks"), launch.argument("chunk_size")) == (chunks, cupy_backend.CHUNK)
    assert launch.argument("device_step") == 0 and launch.argument("grad_scaling") == 0
    assert launch.argument("maximize") == int(hp.maximize)
    assert launch.argument("weight_decay") == (WeightDecay.DECOUPLED if hp.decoupled else WeightDecay.L2)
    assert launch.argument("step_size") == np.float32(hp.step_scalars(case.step).step_size)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_8bit_moments(cupy_on_host, param_dtype):
    test_8bit.test_an_8bit_step_matches_the_float64_model("cupy", 65537, param_dtype)
    (launch,) = cupy_on_host
    assert ", unsigned char," in launch.name_expression
    assert launch.block == (cupy_backend.QUANTIZED_THREADS_PER_BLOCK,), "8-bit moments' launches: their own block"
    assert launch.block[0] % 32 == 0, "the 8-bit path may use warp shuffles: whole warps per block"


def test_capturable_reads_step_and_lr_on_the_device(cupy_on_host):
    device_inputs_tests.test_capturable_keeps_steps_on_the_device_and_matches_torch("cupy")
    device_inputs_tests.test_lr_tensor_changed_in_place_takes_effect("cupy")
    assert cupy_on_host and all(launch.argument("device_step") == 1 for launch in cupy_on_host)


@pytest.mark.parametrize("clip", [None, 0.5], ids=["", "clipped"])
def test_grad_scaler_scale_and_found_inf(cupy_on_host, clip):
    device_inputs_tests.test_grad_scaler_hands_scale_and_found_inf_to_the_kernel("cupy", clip)
    assert cupy_on_host and all(launch.argument("grad_scaling") == 1 for launch in cupy_on_host)


def test_several_tensors_of_mixed_policies_and_steps(cupy_on_host):
    """One launch per (param dtype, moment dtype, step count), each over its tensors' table."""
    hp = HP_OPTIONS[0]
    policies = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
    generator = seeded_generator("cupy launcher multi")
    sizes = [1, 7, 4097, 8193, 20000, 65537]
    cases, params, grads, moments, steps, buffers = [], [], [], ([], [], []), [], []
    for index, size in enumerate(sizes * 2):
        param_dtype, state_dtype = policies[index % len(policies)]
        case = StepCase.draw(size, generator).rounded(param_dtype, state_dtype)
        case.step = 3 if index < len(sizes) else 11
        cases.append(case)
        for values, dtype, where in [(case.param, param_dtype, params), (case.grad, param_dtype, grads)] + [
            (values, state_dtype, moment)
            for values, moment in zip((case.exp_avg, case.exp_avg_sq, case.max_exp_avg_sq), moments, strict=True)
        ]:
            view, buffer = guarded(values, dtype)
            where.append(view)
            buffers.append(buffer)
        steps.append(torch.tensor(float(case.step - 1)))
    fused_adam(
        params, grads, *moments, steps, lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
        weight_decay=hp.weight_decay, decoupled=hp.decoupled, amsgrad=hp.amsgrad, maximize=hp.maximize, backend="cupy",
    )  # fmt: skip
    assert all(guards_intact(buffer) for buffer in buffers), "a launch wrote outside its tensors"
    for index, case in enumerate(cases):
        expected = case.reference(hp)
        actual = (params[index], *(moment[index] for moment in moments))
        for name, value in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), actual, strict=True):
            check = assert_close_relative if value.dtype == torch.float32 else assert_correctly_rounded
            check(value, getattr(expected, name), f"tensor {index} ({value.dtype}) {name}", getattr(case, name))
    assert len(cupy_on_host) == len(policies) * 2
    assert sum(int(launch.argument("n_tensors")) for launch in cupy_on_host) == len(cases)


def test_launches_on_the_tensors_device_made_current(monkeypatch):
    """Tensors on another device than the current one: the launches run with theirs made current (the context the
    driver launches in), and nothing is switched when it is current already."""
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext(entered.append(index)))
    with cupy_backend._on_device(0):
        pass
    assert entered == []
    with cupy_backend._on_device(1):
        pass
    assert entered == [1]
