"""Every change a user can make to an optimizer between steps, on every backend: the next step either matches
torch.optim's for-loop AdamW given the same change, or is refused with a clear error and nothing written in
any group (params, grads, moments, masters and step counts bitwise as they were). Grads are never written.

Each case takes two steps, makes its change (to both optimizers where torch.optim takes it too), then steps
twice more. The params are two groups, so that a change in the second shows it leaves the first unwritten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from support import (
    assert_optimizers_match,
    assert_unchanged,
    backend_params,
    new_grads,
    optimizer_tensors,
    random_tensor,
    seeded_generator,
    snapshot,
)

from adam_gpu import FusedAdamW, step_signature

OPTIONS = dict(lr=1e-2, weight_decay=0.1)
# Group 0, then group 1; shapes chosen so that grads can be views of other params ((5, 3) of (3, 5)).
SHAPES = [[(3, 5)], [(7,), (7,), (5, 3), (3, 5)]]


class Run:
    """Our optimizer and torch.optim.AdamW (for-loop) over equal params in the same two groups."""

    def __init__(self, backend: str, key: str, dtype: torch.dtype = torch.float32, **options) -> None:
        self.generator = seeded_generator("state changes", backend, key)
        self.groups = [[random_tensor(self.generator, *shape, dtype=dtype) for shape in shapes] for shapes in SHAPES]
        self.twins = [[p.detach().clone() for p in group] for group in self.groups]
        torch_options = {k: v for k, v in options.items() if k not in ("master_weights", "capturable")}
        self.ours = FusedAdamW([{"params": g} for g in self.groups], backend=backend, **OPTIONS, **options)
        self.theirs = torch.optim.AdamW([{"params": g} for g in self.twins], foreach=False, **OPTIONS, **torch_options)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for group in self.groups for p in group]

    @property
    def expected(self) -> list[torch.Tensor]:
        return [p for group in self.twins for p in group]

    def new_grads(self) -> None:
        new_grads(self.generator, self.params, self.expected)

    def step(self, count: int) -> None:
        for _ in range(count):
            self.new_grads()
            self.ours.step()
            self.theirs.step()

    def assert_match(self) -> None:
        assert_optimizers_match(self.ours, self.theirs, self.params, self.expected)


@dataclass(frozen=True)
class Change:
    """A change made after two steps. ``both(run)`` changes both optimizers alike and the next steps must match;
    else ``ours(run)`` changes ours only, and its next step must raise ``error`` matching ``match``."""

    both: Callable[[Run], None] | None = None
    ours: Callable[[Run], None] | None = None
    error: type[Exception] = ValueError
    match: str = ""
    options: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    grads_alias_params: bool = False  # (a grad that is a view of a param changes with it)
    no_mapping_version: bool = False  # as where torch's dict version reader fails its check on a defaultdict


def _state(run: Run, group: int = 1, index: int = 0) -> dict:
    return run.ours.state[run.groups[group][index]]


def _both_states(run: Run, group: int = 1, index: int = 0) -> tuple[dict, dict]:
    return run.ours.state[run.groups[group][index]], run.theirs.state[run.twins[group][index]]


def _set_step(value: Callable[[], object]) -> Callable[[Run], None]:
    def change(run: Run) -> None:
        for state in _both_states(run):
            state["step"] = value()

    return change


def _resize_keeping_master(run: Run) -> None:
    """The param resized, its moments and step reset by hand, its master (left from before) forgotten."""
    param = run.groups[1][0]
    param.data = random_tensor(run.generator, 9, dtype=param.dtype)
    param.grad = random_tensor(run.generator, 9, dtype=param.dtype)
    state = _state(run)
    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))


def _grads_then(make: Callable[[Run], None]) -> Callable[[Run], None]:
    """New grads, then ``make`` puts some of another kind in (for ours and, as plain copies, for torch)."""

    def change(run: Run) -> None:
        run.new_grads()
        make(run)
        for param, twin in zip(run.params, run.expected, strict=True):
            twin.grad = param.grad.resolve_neg().clone()

    return change


def _alias_grad(run: Run) -> None:
    """Grads that are views of params of their own group, taken before those params step (as torch's for-loop
    reads them: the param whose grad it is comes first)."""
    first, second, column, row = run.groups[1]
    first.grad = second.data
    column.grad = row.data.t()


def _neg_view(run: Run) -> None:
    grad = run.groups[1][0].grad
    run.groups[1][0].grad = torch._neg_view(grad.neg())  # (contiguous, its negative bit set: the same values)
    assert run.groups[1][0].grad.is_neg() and run.groups[1][0].grad.is_contiguous()


def _conj_imag(run: Run) -> None:
    for param in run.groups[1][:2]:
        values = torch.complex(random_tensor(run.generator, 7), param.grad)
        param.grad = values.conj().imag  # (strided, its negative bit set)
    assert run.groups[1][0].grad.is_neg()


def _expanded(run: Run) -> None:
    run.groups[1][0].grad = random_tensor(run.generator, 1).expand(7)


def _shared(run: Run) -> None:
    run.groups[1][1].grad = run.groups[1][0].grad  # one grad tensor for two params


def _set_(run: Run) -> None:
    for param in (run.groups[1][0], run.twins[1][0]):
        with torch.no_grad():
            param.set_(param.detach().clone() * 0.5)


def _params_edited(run: Run) -> None:
    extra = random_tensor(run.generator, 4)
    for optimizer, params in ((run.ours, run.groups), (run.theirs, run.twins)):
        optimizer.param_groups[1]["params"].pop(1)
        params[1].pop(1)
        params[1].append(extra if optimizer is run.ours else extra.clone())
        optimizer.param_groups[1]["params"].append(params[1][-1])


def _state_replaced(run: Run) -> None:
    """A param's whole state dict replaced by a new one (the optimizer's state mapping changes, not the dicts)."""
    for optimizer, param in ((run.ours, run.groups[1][0]), (run.theirs, run.twins[1][0])):
        optimizer.state[param] = {key: value.clone() * 0.5 if key != "step" else value.clone()
                                  for key, value in optimizer.state[param].items()}  # fmt: skip


def _resized_and_cleared(run: Run) -> None:
    new, grad = random_tensor(run.generator, 11), random_tensor(run.generator, 11)
    for optimizer, param in ((run.ours, run.groups[1][0]), (run.theirs, run.twins[1][0])):
        param.data, param.grad = new.clone(), grad.clone()
        optimizer.state[param].clear()


CHANGES = {
    # Refused: nothing a kernel could overrun or misread reaches it.
    "master of the param before it was resized": Change(
        ours=_resize_keeping_master, match=r"master 0 has shape \(7,\)", options={"master_weights": True},
        dtype=torch.bfloat16,
    ),
    "moments of two dtypes": Change(
        ours=lambda run: _state(run).update(exp_avg_sq=_state(run)["exp_avg_sq"].bfloat16()),
        error=TypeError, match="mixes moment dtypes",
    ),
    "float64 moments of a float32 param": Change(
        ours=lambda run: _state(run).update(exp_avg=_state(run)["exp_avg"].double(),
                                            exp_avg_sq=_state(run)["exp_avg_sq"].double()),
        error=TypeError, match="has dtype torch.float64: the moments of a torch.float32 param",
    ),
    "one moment put in as the other": Change(
        ours=lambda run: _state(run).update(exp_avg_sq=_state(run)["exp_avg"]), match="share memory",
    ),
    "one moment for two params": Change(
        ours=lambda run: _state(run, 1, 1).update(exp_avg=_state(run)["exp_avg"]), match="share memory",
    ),
    "an expanded param": Change(
        ours=lambda run: setattr(run.groups[1][0], "data", random_tensor(run.generator, 1).expand(7)),
        match="param 0 has elements that share memory",
    ),
    "a moment popped": Change(
        ours=lambda run: _state(run).pop("exp_avg_sq"), match="param 0 has no 'exp_avg_sq'",
    ),
    "a master re-typed": Change(
        ours=lambda run: _state(run).update(master_param=_state(run)["master_param"].half()),
        error=TypeError, match="master 0 must be a float32 copy", options={"master_weights": True},
        dtype=torch.bfloat16,
    ),
    "a step count that is a number": Change(
        ours=lambda run: _state(run).update(step=3.0), error=TypeError, match="step count of param 0",
    ),
    "a step count of two elements": Change(
        ours=lambda run: _state(run).update(step=torch.tensor([2.0, 2.0])), error=TypeError,
        match="step count of param 0",
    ),
    "a boolean step count": Change(
        ours=lambda run: _state(run).update(step=torch.tensor(True)), error=TypeError, match="step count of param 0",
    ),
    # Taken, as torch.optim takes them.
    "an int64 step count": Change(both=_set_step(lambda: torch.tensor(2, dtype=torch.int64))),
    "a float64 step count": Change(both=_set_step(lambda: torch.tensor(2.0, dtype=torch.float64))),
    "an int64 step count, capturable": Change(
        both=_set_step(lambda: torch.tensor(2, dtype=torch.int64)), options={"capturable": True},
    ),
    "a float16 step count, capturable": Change(
        both=_set_step(lambda: torch.tensor(2.0, dtype=torch.float16)), options={"capturable": True},
    ),
    "grads that are views of params": Change(both=_grads_then(_alias_grad), grads_alias_params=True),
    "a contiguous grad with the negative bit": Change(both=_grads_then(_neg_view)),
    "grads that are x.conj().imag": Change(both=_grads_then(_conj_imag)),
    "an expanded grad": Change(both=_grads_then(_expanded)),
    "one grad tensor for two params": Change(both=_grads_then(_shared)),
    "a param set_ to new memory": Change(both=_set_),
    "a group's params list edited": Change(both=_params_edited),
    "a param resized and its state cleared": Change(both=_resized_and_cleared),
    "a param's state dict replaced": Change(both=_state_replaced),
    "a param's state dict replaced, mapping versions unread": Change(both=_state_replaced, no_mapping_version=True),
}  # fmt: skip


def _grads(run: Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(p.grad, p.grad.clone()) for p in run.params if p.grad is not None]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", CHANGES)
def test_a_change_between_steps_steps_as_torch_or_is_refused_untouched(backend, name, monkeypatch):
    change = CHANGES[name]
    if change.no_mapping_version:
        monkeypatch.setattr(step_signature, "_mapping_version", None)
    run = Run(backend, name, change.dtype, **change.options)
    run.step(2)
    if change.both is None:
        change.ours(run)
        before = snapshot(optimizer_tensors(run.ours))
        with pytest.raises(change.error, match=change.match):
            run.ours.step()
        assert_unchanged(before, optimizer_tensors(run.ours))
        return
    change.both(run)
    grads = _grads(run)
    run.ours.step()
    run.theirs.step()
    if not change.grads_alias_params:
        for index, (grad, before) in enumerate(grads):
            assert torch.equal(grad.resolve_neg(), before), f"grad {index} was written"
    run.step(2)
    run.assert_match()
    for param in run.params:
        step = run.ours.state[param]["step"]
        if change.options.get("capturable"):
            assert step.dtype == torch.float32 and step.device == param.device, "a capturable count not converted"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "expanded", "negative bit", "shared"])
def test_grads_are_bitwise_unchanged_by_a_step(backend, layout):
    """(Before, the contiguous stand-in of a non-contiguous grad was copied back after the launch.)"""
    run = Run(backend, f"grads {layout}")
    for step in range(3):
        run.new_grads()
        for param in run.params:
            grad = param.grad
            if layout == "transposed" and grad.dim() == 2:
                param.grad = grad.t().contiguous().t()
            elif layout == "expanded":
                param.grad = grad.flatten()[:1].expand(grad.shape)
            elif layout == "negative bit":
                param.grad = torch._neg_view(grad.neg())
        if layout == "shared":
            run.groups[1][1].grad = run.groups[1][0].grad
        grads = _grads(run)
        run.ours.step()
        for index, (grad, before) in enumerate(grads):
            assert torch.equal(grad.resolve_neg(), before), f"step {step}: grad {index} was written"
