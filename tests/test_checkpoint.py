"""Checkpoints: training saved mid-way and restored in a new process continues bit for bit as if it had
never stopped, for every backend and storage policy; a state_dict that does not fit the optimizer (another
model's, truncated, of other group sizes) is refused with an error naming what is wrong, before anything
is loaded."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import (
    DEVICE,
    assert_unchanged,
    backend_params,
    has_feature,
    new_grads,
    optimizer_tensors,
    random_tensor,
    seeded_generator,
    snapshot,
)

from adam_gpu import FusedAdamW
from adam_gpu.quantization import SMALL_TENSOR
from adam_gpu.step_tensors import EIGHT_BIT

SHAPES = [(67, 71), (SMALL_TENSOR + 3,), (1,)]  # two kernel-sized tensors (8-bit moments) and a tiny one
STEPS_BEFORE, STEPS_AFTER = 3, 3
# Storage policies: (param dtype, FusedAdamW options).
POLICIES = {
    "fp32-amsgrad": (torch.float32, {"amsgrad": True}),
    "bf16-fp32-moments-lean-master": (torch.bfloat16, {"state_dtype": torch.float32, "master_weights": "lean"}),
    "fp16-fp32-master": (torch.float16, {"master_weights": True}),
    "fp32-8bit-moments": (torch.float32, {"state_dtype": "8bit"}),
    "fp32-capturable-clipped": (torch.float32, {"capturable": True, "max_grad_norm": 1.0}),
}


def _grads(policy: str, step: int, params: list[torch.Tensor]) -> None:
    """The grads of ``step``: drawn from a generator seeded by the policy and the step, so that any process
    draws the same ones."""
    new_grads(seeded_generator("checkpoint grads", policy, step), params)


def _optimizer(params: list[torch.Tensor], backend: str, policy: str) -> FusedAdamW:
    return FusedAdamW(params, lr=1e-2, weight_decay=0.1, backend=backend, **POLICIES[policy][1])


def _train(optimizer: FusedAdamW, policy: str, steps: range) -> None:
    params = optimizer.param_groups[0]["params"]
    for step in steps:
        _grads(policy, step, params)
        optimizer.step()


def resume(checkpoint: str, result: str, backend: str) -> None:
    """What the new process runs: load every policy's checkpoint, train on, save the params and state."""
    results = {}
    for policy, saved in torch.load(checkpoint).items():
        params = [p.clone() for p in saved["params"]]
        optimizer = _optimizer(params, backend, policy)
        optimizer.load_state_dict(saved["optimizer"])
        _train(optimizer, policy, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
        results[policy] = {"params": params, "state": optimizer.state_dict()["state"]}
    torch.save(results, result)


@pytest.mark.parametrize("backend", backend_params())
def test_restored_in_a_new_process_training_continues_bitwise(backend, tmp_path: Path):
    policies = [p for p in POLICIES if p != "fp32-8bit-moments" or has_feature(backend, EIGHT_BIT)]
    checkpoints, finals = {}, {}
    for policy in policies:
        generator = seeded_generator("checkpoint params", backend, policy)
        params = [random_tensor(generator, *shape, dtype=POLICIES[policy][0]) for shape in SHAPES]
        optimizer = _optimizer(params, backend, policy)
        _train(optimizer, policy, range(STEPS_BEFORE))
        # (A state_dict holds the live state tensors: copy it, as torch.save would at this point.)
        checkpoints[policy] = copy.deepcopy({"params": params, "optimizer": optimizer.state_dict()})
        _train(optimizer, policy, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
        finals[policy] = {"params": params, "state": optimizer.state_dict()["state"]}
    torch.save(checkpoints, tmp_path / "checkpoint.pt")

    code = "import sys, test_checkpoint; test_checkpoint.resume(*sys.argv[1:])"
    arguments = [str(tmp_path / "checkpoint.pt"), str(tmp_path / "result.pt"), backend]
    done = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        cwd=Path(__file__).parent,
        # (tests/ first, then whatever put adam_gpu on the path: benchmarks/run_gpu.sh stages it there.)
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(tmp_path / "result.pt")
    for policy in policies:
        for index, (param, expected) in enumerate(
            zip(resumed[policy]["params"], finals[policy]["params"], strict=True)
        ):
            assert torch.equal(param.cpu(), expected.cpu()), f"{policy}: param {index} differs after resuming"
            assert not torch.equal(expected.cpu(), checkpoints[policy]["params"][index].cpu()), "training did nothing"
        state, expected_state = resumed[policy]["state"], finals[policy]["state"]
        assert state.keys() == expected_state.keys()
        for index in state:
            assert state[index].keys() == expected_state[index].keys(), f"{policy}: state keys of param {index}"
            for key, value in state[index].items():
                assert torch.equal(value.cpu(), expected_state[index][key].cpu()), f"{policy}: {key} of param {index}"


# ---- state_dicts that do not fit ----


def _drop(key: str):
    def change(saved: dict) -> None:
        del saved["state"][1][key]

    return change


def _set(index: int, key: str, value):
    def change(saved: dict) -> None:
        saved["state"][index][key] = value(saved["state"][index])

    return change


def _truncate_group(saved: dict) -> None:
    saved["param_groups"][0]["params"].pop()


def _drop_group(saved: dict) -> None:
    saved["param_groups"].pop()


def _model_state_dict(saved: dict) -> None:
    saved.clear()
    saved["weight"] = torch.ones(3)


def _amsgrad_without_its_maximum(saved: dict) -> None:
    saved["param_groups"][0]["amsgrad"] = True


def _codes_without_absmax(saved: dict) -> None:
    state = saved["state"][0]
    state["exp_avg_codes"] = torch.zeros_like(state.pop("exp_avg"), dtype=torch.uint8)


BAD_STATE_DICTS = {
    "truncated: exp_avg_sq missing": (_drop("exp_avg_sq"), ValueError, "param 1 of group 0: 'exp_avg_sq' is missing"),
    "truncated: step missing": (_drop("step"), ValueError, "param 1 of group 0: 'step' must be a number"),
    "another model: exp_avg of other shape": (
        _set(1, "exp_avg", lambda state: torch.zeros(8)),
        ValueError,
        r"param 1 of group 0: optimizer state 1 has shape \(8,\) but its param has shape \(7,\)",
    ),
    "a moment that is not a tensor": (
        _set(0, "exp_avg_sq", lambda state: [0.0]),
        TypeError,
        "param 0 of group 0: optimizer state 0 is a list",
    ),
    "master of another shape": (
        _set(0, "master_param", lambda state: torch.zeros(2)),
        ValueError,
        r"param 0 of group 0: master 0 has shape \(2,\)",
    ),
    "amsgrad group without max_exp_avg_sq": (_amsgrad_without_its_maximum, ValueError, "'max_exp_avg_sq' is missing"),
    "8-bit codes without their absmax": (_codes_without_absmax, ValueError, "needs an fp32 absmax"),
    "fewer params in a group": (_truncate_group, ValueError, "group 0 of the state_dict has 1 params but .* has 2"),
    "fewer groups": (_drop_group, ValueError, "the state_dict has 0 param groups but this optimizer has 1"),
    "a model's state_dict": (_model_state_dict, ValueError, "not an optimizer state_dict"),
}


@pytest.mark.parametrize("case", BAD_STATE_DICTS)
def test_state_dict_that_does_not_fit_is_refused_before_loading(case):
    change, error, match = BAD_STATE_DICTS[case]
    generator = seeded_generator("bad state_dict", case)
    params = [random_tensor(generator, 3, 5), random_tensor(generator, 7)]
    optimizer = FusedAdamW(params, lr=1e-2, backend="torch")
    new_grads(generator, params)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())  # (its per-param dicts are the live ones)
    change(saved)
    before, groups = snapshot(optimizer_tensors(optimizer)), optimizer.state_dict()["param_groups"]
    with pytest.raises(error, match=match):
        optimizer.load_state_dict(saved)
    assert_unchanged(before, optimizer_tensors(optimizer))
    assert optimizer.state_dict()["param_groups"] == groups
    optimizer.step()  # and it still steps


def test_fresh_state_dict_of_torch_optim_loads():
    """A state_dict saved before torch.optim's first step (no state yet) fits any optimizer of the same sizes."""
    params = [torch.randn(3, device=DEVICE)]
    optimizer = FusedAdamW(params, backend="torch")
    optimizer.load_state_dict(torch.optim.AdamW(params).state_dict())
    assert optimizer.state_dict()["state"] == {}
