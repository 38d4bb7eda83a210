"""The torch backend calls torch's own fused Adam/AdamW kernels where they compute the same step, and its
foreach path elsewhere. Both paths are held to the float64 reference and torch.optim by the suites run for
every backend (test_step, test_multi_tensor, ...); here: which path each kind of step takes, that the fused
path is torch's fused AdamW bit for bit, and that no path writes the grads."""

from __future__ import annotations

import pytest
import torch
from support import DEVICE, new_grads, random_tensor, seeded_generator

from adam_gpu import FusedAdam, FusedAdamW
from adam_gpu.backends import torch as torch_backend

STEPS = 4


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """How many params each call of the fused path stepped."""
    calls: list[int] = []
    step = torch_backend._torch_fused_step
    monkeypatch.setattr(torch_backend, "_torch_fused_step", lambda t, *args: calls.append(len(t)) or step(t, *args))
    return calls


def _params(generator: torch.Generator, dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        random_tensor(generator, *shape, dtype=dtype).to(DEVICE).requires_grad_() for shape in ((33, 7), (1,), (4097,))
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        (FusedAdamW, dict(weight_decay=0.1)),
        (FusedAdam, dict(weight_decay=0.1)),  # L2
        (FusedAdamW, dict(weight_decay=0.0, amsgrad=True, maximize=True)),
    ],
    ids=["adamw", "adam-l2", "amsgrad-maximize"],
)
def test_where_torchs_fused_kernel_fits_the_step_is_torchs_fused_step(dtype, optimizer, options, fused_calls):
    generator = seeded_generator("torch backend fused", dtype, optimizer.__name__, *options.values())
    ours = _params(generator, dtype)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    reference_class = torch.optim.AdamW if optimizer is FusedAdamW else torch.optim.Adam
    ours_optimizer = optimizer(ours, lr=1e-2, backend="torch", **options)
    theirs_optimizer = reference_class(theirs, lr=1e-2, fused=True, **options)
    for _ in range(STEPS):
        new_grads(generator, ours, theirs)
        grads = [p.grad.clone() for p in ours]
        ours_optimizer.step()
        theirs_optimizer.step()
        for grad, param in zip(grads, ours, strict=True):
            assert torch.equal(param.grad, grad), "the step wrote the grads"
    assert fused_calls == [len(ours)] * STEPS
    for ours_param, theirs_param in zip(ours, theirs, strict=True):
        assert torch.equal(ours_param, theirs_param)
        for key, value in theirs_optimizer.state[theirs_param].items():
            assert torch.equal(ours_optimizer.state[ours_param][key].cpu(), value.cpu()), key


def test_strided_tensors_take_the_fused_path_through_contiguous_stand_ins(fused_calls):
    """torch's kernels index memory directly: a transposed param and grad step through contiguous copies,
    written back, exactly as torch's fused AdamW steps contiguous ones; the grads are left as they are."""
    generator = seeded_generator("torch backend strided")
    ours = [random_tensor(generator, 6, 5).t().requires_grad_(), random_tensor(generator, 9).requires_grad_()]
    theirs = [p.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for p in ours]
    ours_optimizer = FusedAdamW(ours, lr=1e-2, weight_decay=0.1, backend="torch")
    theirs_optimizer = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(STEPS):
        new_grads(generator, ours, theirs)
        ours[0].grad = ours[0].grad.t().contiguous().t()
        assert not ours[0].is_contiguous() and not ours[0].grad.is_contiguous()
        grads = [p.grad.clone() for p in ours]
        ours_optimizer.step()
        theirs_optimizer.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads, strict=True)), "the step wrote the grads"
    assert fused_calls == [len(ours)] * STEPS
    for ours_param, theirs_param in zip(ours, theirs, strict=True):
        assert torch.equal(ours_param, theirs_param)
        assert torch.equal(
            ours_optimizer.state[ours_param]["exp_avg_sq"], theirs_optimizer.state[theirs_param]["exp_avg_sq"]
        )


@pytest.mark.parametrize("case", ["fp32-moments", "master-weights", "8bit-moments", "grad-scaling"])
def test_steps_torchs_fused_kernel_does_not_compute_take_the_foreach_path(case, fused_calls):
    """Moments in another dtype than the params, master weights, 8-bit moments (none of which torch's kernels
    store) and grad scaling (they write the unscaled grads back): the foreach path, which leaves the grads as
    they are."""
    generator = seeded_generator("torch backend foreach", case)
    dtype = torch.float32 if case == "grad-scaling" else torch.bfloat16
    params = _params(generator, dtype) if case != "8bit-moments" else [
        random_tensor(generator, 4096, dtype=dtype).to(DEVICE).requires_grad_()
    ]  # fmt: skip
    options = {
        "fp32-moments": dict(state_dtype=torch.float32),
        "master-weights": dict(master_weights=True),
        "8bit-moments": dict(state_dtype="8bit"),
    }.get(case, {})
    optimizer = FusedAdamW(params, lr=1e-2, backend="torch", capturable=case == "grad-scaling", **options)
    for _ in range(2):
        new_grads(generator, params)
        if case == "grad-scaling":  # as GradScaler.step sets them on a capturable optimizer
            optimizer.grad_scale = torch.tensor(4.0, device=DEVICE)
            optimizer.found_inf = torch.tensor(0.0, device=DEVICE)
        grads = [p.grad.clone() for p in params]
        before = [p.detach().clone() for p in params]
        optimizer.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True)), "the step wrote the grads"
        assert not any(torch.equal(p, b) for p, b in zip(params, before, strict=True)), "every param stepped"
    assert fused_calls == []
