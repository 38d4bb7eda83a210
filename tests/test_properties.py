"""Property-based tests: hypothesis draws the size, the storage policy, the hyper-parameters and the options
of one step, and every backend must match the float64 reference and torch.optim on it, with the same
bounds as tests/test_step.py (fp32 within 1e-6 relative; fp16/bf16 within 2x torch's own error and rounded
to nearest). The hyper-parameter ranges are those of real training, ends included: lr up to 0.1, beta1 from
0 (RMSprop-like) to 0.999, beta2 from 0.9 to 0.99999, eps from 1e-12 to 1e-3, weight decay up to 0.5, step
counts from 1 (largest bias correction) to 10^6.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import STEP_POLICIES, StepCase, backend_params, check_one_step

from adam_gpu.hyperparameters import AdamHyperparameters

# Odd and power-of-two-adjacent sizes are the ones that catch tail and alignment bugs.
SIZES = st.one_of(
    st.integers(1, 70),
    st.sampled_from([2**k + d for k in (7, 10, 12, 13) for d in (-1, 0, 1)] + [4099, 8191, 10007]),
)


def _log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high).map(lambda exponent: 10.0**exponent)


HYPERPARAMETERS = st.builds(
    AdamHyperparameters,
    lr=_log_uniform(-5, -1),
    beta1=st.one_of(st.just(0.0), st.floats(0.0, 0.999)),
    beta2=st.one_of(st.just(0.99999), st.floats(0.9, 0.99999)),
    eps=_log_uniform(-12, -3),
    weight_decay=st.one_of(st.just(0.0), st.floats(0.0, 0.5)),
    decoupled=st.booleans(),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
)


@pytest.mark.parametrize("backend", backend_params())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=SIZES,
    policy=st.sampled_from(STEP_POLICIES),
    hp=HYPERPARAMETERS,
    step=st.one_of(st.just(1), st.integers(1, 10**6)),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_step_matches_reference_and_torch(backend, size, policy, hp, step, seed):
    param_dtype, state_dtype = policy
    state_dtype = state_dtype or param_dtype
    case = StepCase.draw(size, torch.Generator().manual_seed(seed))
    case.step = step
    check_one_step(backend, case.rounded(param_dtype, state_dtype), param_dtype, state_dtype, hp)
