"""The float64 reference against torch.optim.Adam/AdamW in float64: the oracle is itself checked."""

from __future__ import annotations

import itertools

import pytest
import torch
from support import StepCase, assert_close_relative, run_torch_optim, seeded_generator

from adam_gpu.hyperparameters import AdamHyperparameters

CONFIGS = [
    pytest.param(
        AdamHyperparameters(lr, 0.9, beta2, 1e-8, wd, decoupled, amsgrad, maximize),
        id=f"lr{lr}-b2{beta2}-wd{wd}{'-decoupled' * decoupled}{'-amsgrad' * amsgrad}{'-maximize' * maximize}",
    )
    for lr, beta2, (wd, decoupled), amsgrad, maximize in itertools.product(
        [1e-3, 0.3], [0.999, 0.95], [(0.0, False), (0.1, False), (0.1, True)], [False, True], [False, True]
    )
]


FLOAT64_RTOL = 1e-12


@pytest.mark.parametrize("hp", CONFIGS)
@pytest.mark.parametrize("size", [1, 4097])
def test_reference_matches_torch_optim_in_float64(hp, size):
    case = StepCase.draw(size, seeded_generator("reference", hp, size))
    expected = run_torch_optim(case, torch.float64, hp, foreach=False)
    actual = case.reference(hp)
    for name in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if getattr(actual, name) is None:
            assert not hp.amsgrad
            continue
        assert_close_relative(getattr(actual, name), getattr(expected, name), name, getattr(case, name), FLOAT64_RTOL)


def test_reference_trajectory_matches_torch_optim_in_float64():
    """20 steps with fresh gradients: bias corrections at every step count, moments carried over."""
    hp = AdamHyperparameters(1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled=True, amsgrad=True)
    generator = seeded_generator("reference-trajectory")
    param = torch.randn(1000, generator=generator, dtype=torch.float64)
    torch_param = param.clone().requires_grad_()
    optimizer = torch.optim.AdamW([torch_param], lr=hp.lr, weight_decay=hp.weight_decay, amsgrad=True)
    exp_avg, exp_avg_sq, max_exp_avg_sq = (torch.zeros_like(param) for _ in range(3))
    for step in range(1, 21):
        grad = torch.randn(1000, generator=generator, dtype=torch.float64)
        param, exp_avg, exp_avg_sq, max_exp_avg_sq = StepCase(
            param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step
        ).reference(hp)
        torch_param.grad = grad
        optimizer.step()
        assert_close_relative(param, torch_param.detach(), f"param at step {step}", rtol=FLOAT64_RTOL)
    state = optimizer.state[torch_param]
    for name, value in [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("max_exp_avg_sq", max_exp_avg_sq)]:
        assert_close_relative(value, state[name], name, rtol=FLOAT64_RTOL)
