"""The CuPy launcher (adam_gpu/backends/cupy.py) on the CPU, with the CUDA runtime faked.

Everything else the CuPy backend runs is shared with the host-execution backend (tests/cuda_host.py):
the specializations, the launch loop and KernelLaunch.arguments(). What only the CuPy launcher does is
assemble the argument tuple CuPy turns into the kernel's parameters, and pick grid and block. Here the
real ``adam_gpu.backends.cupy.adam_step`` runs on CPU tensors; a fake kernel checks every argument
against ``adam_step``'s C++ parameter list in kernels/adam_cuda.cu and the launch against CUDA's limits,
then runs the launch through the host build, so the results are checked against the float64 reference
and torch.optim like any backend's.

How CuPy passes arguments (``cupy/cuda/function.pyx``, ``_pointer``, called by ``_launch`` for each
argument; cupy 14 ships it compiled in cupy/cuda/function.cpython-*.so): a numpy scalar of a listed type
passes its own bytes (np.int32: 4, np.int64: 8, np.float32: 4); a Python ``int`` becomes ``numpy.int64(x)``
(8 bytes), so an address passed as a Python int fills a 64-bit pointer parameter; a Python ``float``
becomes float64 (8 bytes, wrong for a ``float`` parameter) and a Python ``bool`` an int64 (it is an
``int``), so neither may reach a kernel. The checks below hold the launcher to exactly that.
"""

from __future__ import annotations

import contextlib
import re
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


def expected_type(ctype: str) -> type:
    """What the launcher must pass for a parameter of C++ type ``ctype`` (see the module docstring)."""
    if ctype.endswith("*"):
        return int
    return {"int": np.int32, "long long": np.int64, "float": np.float32}[ctype]


def check_arguments(arguments: object) -> None:
    parameters = kernel_parameters()
    assert isinstance(arguments, tuple), f"arguments must be a tuple, got {type(arguments).__name__}"
    assert len(arguments) == len(parameters), f"{len(arguments)} arguments for {len(parameters)} parameters"
    for (ctype, name), argument in zip(parameters, arguments, strict=True):
        want = expected_type(ctype)
        assert type(argument) is want, f"{name} ({ctype}): got {type(argument).__name__}, want {want.__name__}"
        if want is int:  # CuPy's numpy.int64(x) must hold the address, and no pointer argument is null
            assert 0 < argument < 2**63, f"{name}: address {argument:#x}"


def check_dimensions(dimensions: object, limits: tuple[int, ...], what: str) -> None:
    assert isinstance(dimensions, tuple) and 1 <= len(dimensions) <= 3, f"{what} must be a tuple of 1 to 3 ints"
    for size, limit in zip(dimensions, limits, strict=False):
        assert type(size) is int and 0 < size <= limit, f"{what} {dimensions}: each must be an int in [1, {limit}]"


@dataclass
class Launch:
    name_expression: str
    grid: tuple
    block: tuple
    arguments: tuple

    def argument(self, name: str) -> object:
        names = [name for _, name in kernel_parameters()]
        return self.arguments[names.index(name)]


class FakeContexts:
    """The device and stream contexts the launcher has entered (CuPy launches on the current stream)."""

    def __init__(self) -> None:
        self.devices: list[int] = []
        self.streams: list[object] = []

    @contextlib.contextmanager
    def entered(self, stack: list, value: object):
        stack.append(value)
        try:
            yield
        finally:
            stack.pop()


@pytest.fixture
def cupy_on_host(monkeypatch) -> list[Launch]:
    """Run the CuPy backend on CPU tensors: the CUDA runtime faked, each launch checked and then executed by
    the host build of the kernel. Yields the launches made."""
    launches: list[Launch] = []
    contexts = FakeContexts()

    class TorchStream:  # what torch.cuda.current_stream returns: the launcher must launch on it
        cuda_stream = 0x5EED  # the cudaStream_t
        device_index = DEVICE_INDEX

        def __cuda_stream__(self) -> tuple[int, int]:
            return 0, self.cuda_stream

    torch_stream = TorchStream()

    class FakeStream:
        def __init__(self, external: object) -> None:
            self.external = external

        @classmethod
        def from_external(cls, stream: object) -> FakeStream:
            assert stream is torch_stream, "the CuPy stream must wrap torch's current stream"
            assert hasattr(stream, "__cuda_stream__"), "CuPy 14 raises TypeError for a stream without the protocol"
            return cls(stream)

        def __enter__(self) -> None:
            contexts.streams.append(self)

        def __exit__(self, *exc: object) -> None:
            contexts.streams.pop()

    def external_stream(pointer: int, device_id: int) -> FakeStream:  # CuPy 13's way
        assert (pointer, device_id) == (torch_stream.cuda_stream, DEVICE_INDEX), "not torch's current stream"
        return FakeStream(torch_stream)

    def fake_device(index: int) -> contextlib.AbstractContextManager:
        assert type(index) is int and index == DEVICE_INDEX, f"cupy.cuda.Device({index!r})"
        return contexts.entered(contexts.devices, index)

    def current_stream(device: object = None) -> object:
        assert device in (None, DEVICE_INDEX), f"torch.cuda.current_stream({device!r})"
        return torch_stream

    def fake_unused_values(device: torch.device) -> torch.Tensor:
        assert device == torch.device("cuda", DEVICE_INDEX), f"unused scalars requested on {device}"
        return unused_values(torch.device("cpu"))

    class FakeKernel:
        def __init__(self, device_index: int, name_expression: str) -> None:
            assert device_index == DEVICE_INDEX
            assert name_expression in cuda_source.all_name_expressions(), (
                f"not a compiled specialization: {name_expression}"
            )
            self.name_expression = name_expression

        def __call__(self, grid: tuple, block: tuple, arguments: tuple, shared_mem: int = 0, stream=None) -> None:
            assert stream is None and shared_mem == 0
            assert contexts.devices == [DEVICE_INDEX], "launched outside cupy.cuda.Device(index)"
            assert [s.external for s in contexts.streams] == [torch_stream], "launched outside torch's stream"
            check_dimensions(grid, GRID_LIMITS, "grid")
            check_dimensions(block, BLOCK_LIMITS, "block")
            assert int(np.prod(block)) <= MAX_THREADS_PER_BLOCK, f"block {block}: more than 1024 threads"
            assert len(grid) == len(block) == 1, "the kernel indexes x only"
            check_arguments(arguments)
            launches.append(Launch(self.name_expression, grid, block, arguments))
            cuda_host.launch_kernel_arguments(self.name_expression, grid[0], block[0], arguments)

    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        return None if dtype in KERNEL_DTYPES else f"not a kernel dtype: {dtype}"

    monkeypatch.setattr(cupy.cuda, "Stream", FakeStream)
    monkeypatch.setattr(cupy.cuda, "ExternalStream", external_stream)
    monkeypatch.setattr(cupy.cuda, "Device", fake_device)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: DEVICE_INDEX)
    monkeypatch.setattr(cupy_backend, "unavailable_reason", unavailable_reason)
    monkeypatch.setattr(cupy_backend, "unused_values", fake_unused_values)
    monkeypatch.setattr(cupy_backend, "_multiprocessors", lambda device_index: MULTIPROCESSORS)
    monkeypatch.setattr(cupy_backend, "_kernel", FakeKernel)
    return launches


def test_the_checks_refuse_what_cupy_would_pass_wrongly():
    """The fake kernel's checks bite: a Python float, an np.int64 for an ``int``, a bool, a missing argument."""
    parameters = kernel_parameters()
    assert len(parameters) == 21 and parameters[3] == ("int", "n_tensors") and parameters[0][0] == "long long *"
    good = tuple(expected_type(ctype)(1) for ctype, _ in parameters)
    check_arguments(good)
    for index, bad in [(3, np.int64(1)), (4, np.int32(1)), (9, True), (11, 0.9), (0, np.int64(1 << 40))]:
        with pytest.raises(AssertionError):
            check_arguments((*good[:index], bad, *good[index + 1 :]))
    with pytest.raises(AssertionError):
        check_arguments(good[:-1])
    with pytest.raises(AssertionError):
        check_dimensions((1025,), BLOCK_LIMITS, "block")


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


@pytest.mark.parametrize("missing", ["cupy-from_external", "torch-__cuda_stream__"])
def test_without_the_stream_protocol_it_launches_on_torchs_stream_through_external_stream(
    cupy_on_host, monkeypatch, missing
):
    """CuPy 13 has no Stream.from_external, and torch before 2.10 no __cuda_stream__: ExternalStream then."""
    if missing == "cupy-from_external":
        monkeypatch.delattr(cupy.cuda.Stream, "from_external")
    else:
        monkeypatch.delattr(type(torch.cuda.current_stream()), "__cuda_stream__")
    hp = HP_OPTIONS[0]
    case = StepCase.draw(4097, seeded_generator("cupy launcher stream", missing)).rounded(torch.float32, torch.float32)
    check_one_step("cupy", case, torch.float32, torch.float32, hp)
    assert len(cupy_on_host) == 1
