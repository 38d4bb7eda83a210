"""Determinism: the same inputs give bitwise-equal params and state run to run, and whatever the order of
the groups and of the params inside them (each element's update depends on its own values only; the one
reduction, fused clipping's global norm, sums the per-tensor norms in sorted order)."""

from __future__ import annotations

import pytest
import torch
from support import backend_params, has_feature, new_grads, random_tensor, seeded_generator

from adam_gpu import FusedAdamW
from adam_gpu.step_tensors import EIGHT_BIT

SHAPES = [(4097,), (3, 5), (1,), (67, 71), (1000,)]
STEPS = 4
POLICIES = {
    "fp32-clipped": (torch.float32, {"max_grad_norm": 0.5}),
    "fp32-amsgrad-capturable": (torch.float32, {"amsgrad": True, "capturable": True}),
    "bf16-fp32-moments-master": (torch.bfloat16, {"state_dtype": torch.float32, "master_weights": True}),
    "fp32-8bit-moments-clipped": (torch.float32, {"state_dtype": "8bit", "max_grad_norm": 0.5}),
}
# Orders of the params (indices into SHAPES), as groups.
ORDERS = {
    "two groups": [[0, 1, 2], [3, 4]],
    "reversed": [[4, 3], [2, 1, 0]],
    "one shuffled group": [[3, 0, 4, 2, 1]],
}


def _trained(backend: str, policy: str, order: list[list[int]]) -> list[tuple[torch.Tensor, dict]]:
    """Params and state after STEPS steps, listed in SHAPES order whatever ``order`` grouped them in."""
    dtype, options = POLICIES[policy]
    generator = seeded_generator("determinism params", backend, policy)
    params = [random_tensor(generator, *shape, dtype=dtype) for shape in SHAPES]
    groups = [{"params": [params[i] for i in group]} for group in order]
    optimizer = FusedAdamW(groups, lr=1e-2, weight_decay=0.1, backend=backend, **options)
    for step in range(STEPS):
        new_grads(seeded_generator("determinism grads", backend, policy, step), params)
        optimizer.step()
    return [(param, optimizer.state[param]) for param in params]


def _assert_bitwise_equal(ours: list, theirs: list, what: str) -> None:
    for index, ((param, state), (their_param, their_state)) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(param, their_param), f"{what}: param {index}"
        assert state.keys() == their_state.keys(), f"{what}: state keys of param {index}"
        for key, value in state.items():
            assert torch.equal(value, their_state[key]), f"{what}: {key} of param {index}"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("policy", POLICIES)
def test_same_inputs_give_the_same_bits_in_any_order(backend, policy):
    if POLICIES[policy][1].get("state_dtype") == "8bit" and not has_feature(backend, EIGHT_BIT):
        pytest.skip(f"the {backend} backend has no 8-bit moments")
    first, *others = ORDERS
    expected = _trained(backend, policy, ORDERS[first])
    start = random_tensor(seeded_generator("determinism params", backend, policy), *SHAPES[0])
    assert not torch.equal(expected[0][0], start.to(expected[0][0].dtype)), "training did nothing"
    _assert_bitwise_equal(_trained(backend, policy, ORDERS[first]), expected, "run to run")
    for order in others:
        _assert_bitwise_equal(_trained(backend, policy, ORDERS[order]), expected, order)
