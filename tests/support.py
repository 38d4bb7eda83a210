"""What the tests share: the device, the backends that run on it, random inputs and error measures."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

from adam_gpu import FusedAdam, FusedAdamW, dispatch, fused_adam
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.reference import AdamState, reference_adam_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The CUDA C kernel executed on the host (tests/cuda_host.py) joins the dispatch table for the tests,
# so every test that takes a backend runs it like the real ones.
dispatch.BACKENDS.setdefault("cuda-host", dispatch.Backend("cuda-host", "cuda_host", requires=None))
# ADAM_GPU_TEST_BACKENDS=triton,torch restricts the backends under test (default: all registered).
BACKEND_NAMES = [name for name in os.environ.get("ADAM_GPU_TEST_BACKENDS", ",".join(dispatch.BACKENDS)).split(",")]
SIZES = [1, 2, 4097, 65537, 278011]
# (param dtype, state_dtype): the storage policies the kernels support.
POLICIES = [
    (torch.float32, None),
    (torch.float16, None),
    (torch.float16, torch.float32),
    (torch.bfloat16, None),
    (torch.bfloat16, torch.float32),
]
# Storage policies torch.optim itself has (moments in the param dtype, or fp32 beside 16-bit params),
# plus bf16 moments beside fp32 params, which torch has no counterpart for.
STEP_POLICIES = [*POLICIES, (torch.float32, torch.bfloat16)]
# Measurements for the end of the pytest log, by section title (see conftest.pytest_terminal_summary).
REPORT: dict[str, list[str]] = {}
GUARD = 5  # elements of poison on each side of every tensor; odd, so views are also misaligned
ALIGNED_GUARD = 8  # 16 or 32 bytes of 16- or 32-bit elements: the view as aligned as its buffer
POISON = float("nan")


def backend_params() -> list:
    """One pytest param per backend, skipped with the dispatcher's reason where it cannot run here."""
    params = []
    for name in BACKEND_NAMES:
        reason = dispatch.unavailable_reason(name, DEVICE, [torch.float32])
        marks = [pytest.mark.skip(reason=f"backend {name} unavailable: {reason}")] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def has_feature(backend: str, feature: str) -> bool:
    """Whether a backend module lists ``feature`` (e.g. step_tensors.EIGHT_BIT) in its FEATURES."""
    return feature in getattr(dispatch.BACKENDS[backend].load(), "FEATURES", frozenset())


def policy_id(policy: tuple[torch.dtype, torch.dtype | None]) -> str:
    param_dtype, state_dtype = policy
    name = str(param_dtype).removeprefix("torch.")
    return name if state_dtype is None else f"{name}-{str(state_dtype).removeprefix('torch.')}-state"


def seeded_generator(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters (and ADAM_GPU_TEST_SEED), so every test draws its
    own data and a failure reproduces."""
    text = "/".join(map(str, key)) + os.environ.get("ADAM_GPU_TEST_SEED", "")
    return torch.Generator().manual_seed(zlib.crc32(text.encode()))


def guarded(values: torch.Tensor, dtype: torch.dtype, guard: int = GUARD) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` in ``dtype`` on DEVICE as a view inside a buffer poisoned with NaN on both sides, ``guard``
    elements each (GUARD: the view misaligned; ALIGNED_GUARD: 16-byte aligned, as a fresh tensor is).

    Returns ``(view, buffer)``; ``guards_intact(buffer)`` later proves nothing was written outside.
    """
    buffer = torch.full((values.numel() + 2 * guard,), POISON, dtype=dtype, device=DEVICE)
    view = buffer[guard : guard + values.numel()].view(values.shape)
    view.copy_(values)
    return view, buffer


def guards_intact(buffer: torch.Tensor) -> bool:
    return bool(buffer[:GUARD].isnan().all() and buffer[-GUARD:].isnan().all())


@dataclass
class StepCase:
    """Random inputs of one step: never zeros, moments as after ``step - 1`` earlier steps."""

    param: torch.Tensor
    grad: torch.Tensor | None
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor
    step: int

    @classmethod
    def draw(cls, numel: int, generator: torch.Generator) -> StepCase:
        def randn() -> torch.Tensor:
            return torch.randn(numel, generator=generator, dtype=torch.float64)

        def rand() -> torch.Tensor:
            return torch.rand(numel, generator=generator, dtype=torch.float64)

        exp_avg_sq = 0.5 * rand() + 0.01
        return cls(
            param=randn(),
            grad=randn(),
            exp_avg=0.3 * randn(),
            exp_avg_sq=exp_avg_sq,
            # About half the elements keep their old maximum, half take the new second moment.
            max_exp_avg_sq=exp_avg_sq * (0.5 + rand()),
            step=int(torch.randint(1, 40, (1,), generator=generator)),
        )

    def rounded(self, param_dtype: torch.dtype, state_dtype: torch.dtype) -> StepCase:
        """The inputs as the kernel will see them, rounded to storage and back to float64, so the
        reference starts from exactly the stored values."""

        def to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return t.to(dtype).to(torch.float64)

        return StepCase(
            to(self.param, param_dtype),
            to(self.grad, param_dtype),
            to(self.exp_avg, state_dtype),
            to(self.exp_avg_sq, state_dtype),
            to(self.max_exp_avg_sq, state_dtype),
            self.step,
        )

    def reference(self, hp: AdamHyperparameters) -> AdamState:
        return self.reference_with(self.grad, self.step, hp)

    def reference_with(self, grad: torch.Tensor, step: int, hp: AdamHyperparameters) -> AdamState:
        """The float64 step from this case's param and moments with another grad and step number."""
        return reference_adam_step(self.param, grad, self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq, step, hp)


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().to(torch.float64).cpu() - expected.cpu()).abs().max())


def _scale(*tensors: torch.Tensor | None) -> float:
    """The magnitude rounding errors are relative to: the largest value before or after the step."""
    return max(float(t.detach().abs().max()) for t in tensors if t is not None)


FP32_RTOL = 1e-6

# Beyond this relative error against the float64 reference, torch.optim would be computing another step (its
# options read otherwise than the reference reads them), not rounding the same one differently. Rounding alone
# reaches ~1e-3 where beta2 is near 1: torch's CUDA fused Adam/AdamW (2.11) forms 1 - beta in fp32 from betas
# rounded to fp32, so 1 - beta2 is 1.3e-5 off at 0.999 and 1.4e-3 off at 0.99999 (measured on an H200: a second
# moment grown from zero 1.29e-5 off, params up to 6.7e-6 off in single steps, where ours are within 1e-7).
TORCH_SAME_STEP_RTOL = 1e-2


def relative_error(actual: torch.Tensor, expected: torch.Tensor, before: torch.Tensor | None = None) -> float:
    """The smallest ``rtol`` with which ``assert_close_relative(actual, expected, ..., before, rtol)`` passes."""
    expected = expected.to(torch.float64).cpu()
    error = (actual.detach().to(torch.float64).cpu() - expected).abs()
    return float((error / (expected.abs() + _scale(expected, before))).max())


def torch_error(torch_results: list[torch.Tensor], expected: torch.Tensor) -> float:
    """torch.optim's own error against the float64 ``expected``: that of its best implementation.

    An implementation whose result is not finite is left out: torch's for-loop in fp16 rounds eps=1e-8
    to 0 and can divide 0 by 0, which is torch's failure, not a bound on ours.
    """
    errors = [max_abs_error(result, expected) for result in torch_results]
    finite = [error for error in errors if math.isfinite(error)]
    assert finite, f"no torch.optim implementation gave a finite result ({errors})"
    return min(finite)


def assert_close_relative(
    actual: torch.Tensor,
    expected: torch.Tensor,
    what: str,
    before: torch.Tensor | None = None,
    rtol: float = FP32_RTOL,
) -> None:
    """Agreement within ``rtol`` (default: the fp32 tolerance, 1e-6) relative to the element, or to the
    largest magnitude in the tensor before or after the step where an element cancels to nearly zero
    (m = b1*m + (1-b1)*g can, and relative error is meaningless there)."""
    expected = expected.to(torch.float64).cpu()
    scale = _scale(expected, before)
    torch.testing.assert_close(
        actual.detach().to(torch.float64).cpu(), expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}"
    )


def run_torch_optim(case: StepCase, dtype: torch.dtype, hp: AdamHyperparameters, **impl: bool) -> AdamState:
    """torch.optim.Adam/AdamW itself on ``case`` stored in ``dtype`` (params and moments, torch's layout);
    ``impl`` picks the implementation (``foreach=False`` or ``fused=True``)."""
    param = case.param.to(dtype=dtype, device=DEVICE, copy=True).requires_grad_()
    optimizer_class = torch.optim.AdamW if hp.decoupled else torch.optim.Adam
    optimizer = optimizer_class(
        [param],
        lr=hp.lr,
        betas=(hp.beta1, hp.beta2),
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        amsgrad=hp.amsgrad,
        maximize=hp.maximize,
        **impl,
    )
    param.grad = case.grad.to(dtype=dtype, device=DEVICE, copy=True)
    state = {
        "step": torch.tensor(float(case.step - 1)),
        "exp_avg": case.exp_avg.to(dtype=dtype, device=DEVICE, copy=True),
        "exp_avg_sq": case.exp_avg_sq.to(dtype=dtype, device=DEVICE, copy=True),
    }
    if hp.amsgrad:
        state["max_exp_avg_sq"] = case.max_exp_avg_sq.to(dtype=dtype, device=DEVICE, copy=True)
    if impl.get("fused"):
        state["step"] = state["step"].to(DEVICE)
    optimizer.state[param] = state
    optimizer.step()
    return AdamState(param.detach(), state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"))


def torch_implementations(dtype: torch.dtype) -> list[dict[str, bool]]:
    """torch.optim's implementations that run this dtype on DEVICE: the for-loop and the fused one."""
    return [{"foreach": False}, {"fused": True}]


def assert_correctly_rounded(
    actual: torch.Tensor, expected: torch.Tensor, what: str, before: torch.Tensor | None = None
) -> None:
    """Low-precision storage: every element is the float64 ``expected`` rounded to nearest in ``actual``'s
    dtype, up to fp32 math error: ``|actual - expected| <= ulp/2 + 1e-6 * max|expected|``.

    A kernel that truncates instead of rounding is off by up to a whole ulp and fails in about half the
    elements; the other term is the fp32 tolerance of ``assert_close_relative``.
    """
    expected = expected.to(torch.float64).cpu().flatten()
    actual = actual.detach().cpu().flatten()
    magnitude = expected.abs().to(actual.dtype)
    ulp = (torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude).to(torch.float64)
    error = (actual.to(torch.float64) - expected).abs()
    bound = 0.5 * ulp + FP32_RTOL * _scale(expected, before)
    worst = int((error - bound).argmax())
    assert bool((error <= bound).all()), (
        f"{what}: element {worst} is {float(actual[worst])}, float64 value {float(expected[worst])}, "
        f"error {float(error[worst]):.3g} > half an ulp {float(0.5 * ulp[worst]):.3g}"
    )


def random_tensor(generator: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal values (never all zeros) drawn from ``generator`` in float64, stored in ``dtype`` on DEVICE."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


# Each adam-gpu optimizer beside the torch.optim class it stands in for.
OPTIMIZERS = {"adam": (FusedAdam, torch.optim.Adam), "adamw": (FusedAdamW, torch.optim.AdamW)}
SMALL_SHAPES = [(3, 5), (7,)]


def small_params(generator: torch.Generator, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Two small random params (a matrix and a vector), for API tests."""
    return [random_tensor(generator, *shape, dtype=dtype) for shape in SMALL_SHAPES]


def optimizer_tensors(optimizer: torch.optim.Optimizer, but: str | None = None) -> dict[str, object]:
    """Every param, grad and state entry (``step`` included) of ``optimizer`` by where it lives, e.g.
    ``"group 1 param 0 exp_avg"``, plus the number of params with state; all but the entry named ``but`` (one a
    test made unfit). Take a ``snapshot`` of it."""
    found: dict[str, object] = {"params with state": len(optimizer.state)}
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            where = f"group {group_index} param {param_index}"
            found[f"{where} value"] = param
            found[f"{where} grad"] = param.grad
            for key, value in optimizer.state.get(param, {}).items():
                found[f"{where} {key}"] = value
    found.pop(but, None)
    return found


def snapshot(named: dict[str, object]) -> dict[str, object]:
    """Clones of the tensors in ``named`` (other values as they are), for ``assert_unchanged``."""
    return {name: value.detach().clone() if isinstance(value, torch.Tensor) else value for name, value in named.items()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    dense = tensor.to_dense() if tensor.layout != torch.strided else tensor
    return dense.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_unchanged(before: dict[str, object], named: dict[str, object]) -> None:
    """Every entry of ``named`` is bitwise what ``before`` (a ``snapshot``) holds, and no entry came or went.
    Tensors on the ``meta`` device hold no values: their dtype, shape and layout are compared."""
    assert named.keys() == before.keys(), f"entries changed: {sorted(named.keys() ^ before.keys())}"
    for name, value in named.items():
        old = before[name]
        if not isinstance(value, torch.Tensor):
            assert value == old, f"{name}: {old!r} became {value!r}"
            continue
        kind, old_kind = [(t.dtype, tuple(t.shape), t.layout, t.device) for t in (value, old)]
        assert kind == old_kind, f"{name}: {old_kind} became {kind}"
        if value.device.type != "meta":
            assert torch.equal(_bits(value), _bits(old)), f"{name} was written"


def assert_optimizers_match(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, params, expected) -> None:
    """Each of ``params`` close to its twin in ``expected``, and every state entry torch.optim (``theirs``) keeps
    for the twin close to ours (compared in fp32 where ours keeps a count or moment in another dtype)."""
    for index, (param, twin) in enumerate(zip(params, expected, strict=True)):
        assert_close_relative(param, twin, f"param {index}")
        for key, value in theirs.state[twin].items():
            mine = ours.state[param][key]
            if mine.dtype != value.dtype:
                mine, value = mine.float(), value.float()
            assert_close_relative(mine, value, f"{key} {index}")


def new_grads(generator: torch.Generator, *param_lists: list[torch.Tensor]) -> None:
    """A fresh random grad for every param; the i-th params of all ``param_lists`` get equal (unshared) grads."""
    for params in zip(*param_lists, strict=True):
        grad = random_tensor(generator, *params[0].shape, dtype=params[0].dtype)
        for param in params:
            param.grad = grad.to(device=param.device, dtype=param.dtype, copy=True)


def skip_unless_backend_runs(name: str, dtype: torch.dtype = torch.float32) -> None:
    """Skip the calling test, with the dispatcher's reason, where backend ``name`` cannot run ``dtype`` on DEVICE."""
    reason = dispatch.unavailable_reason(name, DEVICE, [dtype])
    if reason is not None:
        pytest.skip(f"backend {name} unavailable: {reason}")


MOMENT_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def fused_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    moments: list[torch.Tensor],
    step: torch.Tensor,
    hp: AdamHyperparameters,
    backend: str,
) -> str | None:
    """``fused_adam`` on one param with ``moments`` = [exp_avg, exp_avg_sq, max_exp_avg_sq] and ``hp``."""
    return fused_adam(
        [param],
        [grad],
        [moments[0]],
        [moments[1]],
        [moments[2]],
        [step],
        lr=hp.lr,
        beta1=hp.beta1,
        beta2=hp.beta2,
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        decoupled=hp.decoupled,
        amsgrad=hp.amsgrad,
        maximize=hp.maximize,
        backend=backend,
    )


def check_one_step(
    backend: str, case: StepCase, param_dtype: torch.dtype, state_dtype: torch.dtype, hp: AdamHyperparameters
) -> None:
    """One ``fused_adam`` step of ``case`` (already rounded to its storage dtypes) on ``backend``, in
    NaN-poisoned buffers, against the float64 reference and torch.optim: fp32 outputs within 1e-6
    relative of the reference and of each torch implementation beyond its own error (TORCH_SAME_STEP_RTOL);
    low-precision ones within 2x torch's own error and rounded to nearest in every element."""
    param, param_buffer = guarded(case.param, param_dtype)
    grad, grad_buffer = guarded(case.grad, param_dtype)
    moments = [guarded(v, state_dtype) for v in (case.exp_avg, case.exp_avg_sq, case.max_exp_avg_sq)]
    step = torch.tensor(float(case.step - 1))
    ran = fused_step(param, grad, [view for view, _ in moments], step, hp, backend)
    assert ran == backend
    assert float(step) == case.step
    for buffer in (param_buffer, grad_buffer, *(b for _, b in moments)):
        assert guards_intact(buffer), "the step wrote outside its tensor"
    torch.testing.assert_close(grad.cpu().double(), case.grad, rtol=0, atol=0, msg="the step changed the grad")

    expected = case.reference(hp)
    outputs = {"param": param} | {name: view for name, (view, _) in zip(MOMENT_NAMES, moments, strict=True)}
    if not hp.amsgrad:
        outputs.pop("max_exp_avg_sq")
        torch.testing.assert_close(moments[2][0].cpu().double(), case.max_exp_avg_sq, rtol=0, atol=0)
    by_torch = [run_torch_optim(case, param_dtype, hp, **impl) for impl in torch_implementations(param_dtype)]
    for name, actual in outputs.items():
        reference = getattr(expected, name)
        before = getattr(case, name)
        if actual.dtype == torch.float32:
            assert_close_relative(actual, reference, f"{name} vs float64 reference", before)
            if param_dtype == torch.float32:
                for torch_state in by_torch:
                    theirs = getattr(torch_state, name)
                    own = relative_error(theirs, reference, before)
                    assert own <= TORCH_SAME_STEP_RTOL, f"{name}: torch.optim is {own:.1e} off the float64 reference"
                    rtol = FP32_RTOL + 2 * own  # 1e-6 where torch itself is within rounding of the reference
                    assert_close_relative(actual, theirs, f"{name} vs torch.optim", before, rtol)
            continue
        # Low precision: within 2x torch's own error (its best implementation, where torch stores this
        # tensor in this dtype too) against the float64 reference, and rounded to nearest in every element
        # (up to fp32 math error).
        if actual.dtype == param_dtype:
            torch_own = torch_error([getattr(s, name) for s in by_torch], reference)
            assert max_abs_error(actual, reference) <= 2 * torch_own, f"{name}: error beyond 2x torch's own"
        assert_correctly_rounded(actual, reference, name, before)


REPO_ROOT = Path(__file__).resolve().parent.parent


def import_script(relative_path: str) -> ModuleType:
    """A script of the checkout that is not part of the package (``examples/``, ``benchmarks/``), imported
    as a module under its file name, so its functions run in the test's process (no second torch import)."""
    path = REPO_ROOT / relative_path
    if path.stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # before exec: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[path.stem]
