"""Faults: NaN and Inf grads without a GradScaler do what torch.optim does: they reach the params and
moments (Adam has no guard of its own; with a GradScaler such steps are skipped), NaN, +Inf and -Inf at
exactly torch's elements; and a step that fails part-way leaves no group half-updated."""

from __future__ import annotations

import sys

import pytest
import torch
from support import (
    OPTIMIZERS,
    assert_unchanged,
    backend_params,
    new_grads,
    optimizer_tensors,
    random_tensor,
    seeded_generator,
    snapshot,
)

from adam_gpu import FusedAdamW, dispatch

# Triton's interpreter computes with numpy, which warns about the NaN it is meant to compute here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

SHAPES = [(4097,), (3, 5)]
# What is checked here is where the non-finite values go; the finite ones only need to be torch's up to
# rounding: fp32 within its float error; bf16 within 4 ulps (2**-5 relative), rounding differences of
# three bf16 steps compound (3 ulps measured). Finite accuracy itself: tests/test_step.py.
TOLERANCES = {torch.float32: 1e-6, torch.bfloat16: 2**-5}


def _poison(grad: torch.Tensor) -> None:
    """NaN, +Inf and -Inf at a few places, the rest of the grad finite."""
    flat = grad.view(-1)
    flat[0], flat[-1], flat[flat.numel() // 2] = float("nan"), float("inf"), float("-inf")


def _assert_same_including_non_finite(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Finite elements close, and NaN, +Inf and -Inf each at the same elements."""
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(test(actual), test(expected)), f"{what}: {name} at other elements than torch.optim's"
    rtol = TOLERANCES[actual.dtype]
    finite = torch.isfinite(expected)
    scale = float(expected[finite].abs().max())
    torch.testing.assert_close(
        actual[finite], expected[finite], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("dtype", TOLERANCES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_nan_and_inf_grads_do_what_torch_optim_does(backend, kind, dtype, amsgrad):
    ours_class, torch_class = OPTIMIZERS[kind]
    generator = seeded_generator("non-finite grads", backend, kind, dtype, amsgrad)
    params = [random_tensor(generator, *shape, dtype=dtype) for shape in SHAPES]
    expected = [p.clone() for p in params]
    options = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    ours, theirs = ours_class(params, backend=backend, **options), torch_class(expected, foreach=False, **options)
    for step in range(3):  # poisoned at the second step: the NaN/Inf then stay in the moments
        new_grads(generator, params, expected)
        if step == 1:
            for param in (*params, *expected):
                _poison(param.grad)
        ours.step()
        theirs.step()
    for index, (param, twin) in enumerate(zip(params, expected, strict=True)):
        _assert_same_including_non_finite(param, twin, f"param {index}")
        for key, value in theirs.state[twin].items():
            if key != "step":
                _assert_same_including_non_finite(ours.state[param][key], value, f"{key} of param {index}")
    assert not torch.isfinite(params[0]).all(), "the poison did not reach the params"


# Tensors whose last elements fall in every position of a vector loop's tail (torch's fused CPU kernel steps its last
# numel % 16 fp32 or % 32 bf16 elements one by one), and one whose tail is empty.
TAIL_SIZES = [1, 15, 16, 17, 31, 32, 33, 47, 63, 64, 1000]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_nan_second_moment_anywhere_reaches_amsgrads_max_as_in_torch(backend, dtype):
    """A NaN grad at every other element, at the second step: amsgrad's max is NaN exactly where torch.optim's
    for-loop makes it NaN, at every position of every tensor (its vector loop's and its tail's alike)."""
    generator = seeded_generator("nan amsgrad max", backend, dtype)
    params = [random_tensor(generator, size, dtype=dtype) for size in TAIL_SIZES]
    expected = [p.clone() for p in params]
    ours = FusedAdamW(params, lr=1e-2, amsgrad=True, backend=backend)
    theirs = torch.optim.AdamW(expected, lr=1e-2, amsgrad=True, foreach=False)
    for step in range(2):
        new_grads(generator, params, expected)
        if step == 1:
            for param in (*params, *expected):
                param.grad[step % 2 :: 2] = float("nan")
        ours.step()
        theirs.step()
    for index, (param, twin) in enumerate(zip(params, expected, strict=True)):
        ours_max, torch_max = ours.state[param]["max_exp_avg_sq"], theirs.state[twin]["max_exp_avg_sq"]
        assert torch.equal(ours_max.isnan(), torch_max.isnan()), f"param {index} ({TAIL_SIZES[index]} elements)"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("capturable", [False, True], ids=["", "capturable"])
def test_failing_launch_leaves_its_group_and_later_ones_untouched(backend, capturable, monkeypatch):
    generator = seeded_generator("failing launch", backend, capturable)
    groups = [{"params": [random_tensor(generator, *shape) for shape in SHAPES]} for _ in range(3)]
    optimizer = OPTIMIZERS["adamw"][0](groups, lr=1e-2, backend=backend, capturable=capturable)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    new_grads(generator, params)
    optimizer.step()  # every param has state
    new_grads(generator, params)
    before = snapshot(optimizer_tensors(optimizer))

    module = dispatch.BACKENDS[backend].load()
    launches = []

    def adam_step(*args, **kwargs) -> None:
        launches.append(len(launches))
        if len(launches) == 2:
            raise RuntimeError("launch failed")
        module_adam_step(*args, **kwargs)

    module_adam_step = module.adam_step
    monkeypatch.setattr(module, "adam_step", adam_step)
    with pytest.raises(RuntimeError, match="launch failed") as failure:
        optimizer.step()
    if sys.version_info >= (3, 11):  # exception notes
        assert "param group 1" in "".join(failure.value.__notes__)

    after = optimizer_tensors(optimizer)
    stepped = {name for name in after if name.startswith("group 0 ") and "grad" not in name}
    for name in stepped:  # group 0 took its whole step, counts included
        assert not torch.equal(after[name], before[name]), f"{name} was not written"
    assert_unchanged(
        {k: v for k, v in before.items() if k not in stepped}, {k: after[k] for k in before if k not in stepped}
    )
    for param in params[len(SHAPES) :]:
        assert float(optimizer.state[param]["step"]) == 1.0, "a failed step counted"

    monkeypatch.setattr(module, "adam_step", module_adam_step)
    optimizer.step()  # the fault gone, every group steps again
    assert [float(optimizer.state[p]["step"]) for p in params] == [3.0] * len(SHAPES) + [2.0] * 2 * len(SHAPES)
