"""A step whose tensors are unchanged since the group's last full check skips the per-tensor checks and
reuses its tensor tables (FusedAdam._reusable); every change a user can make between steps is still
seen: a changed hyper-parameter, state tensor, step count, param ``.data`` or group is used, and a bad
grad or state is refused with the full checks' error, nothing written. Trajectories are compared with
torch.optim's for-loop implementation, as in test_optimizer_api.py."""

from __future__ import annotations

import copy
import gc
import weakref
from collections import OrderedDict

import pytest
import torch
from support import (
    DEVICE,
    OPTIMIZERS,
    assert_optimizers_match,
    assert_unchanged,
    backend_params,
    new_grads,
    optimizer_tensors,
    random_tensor,
    seeded_generator,
    small_params,
    snapshot,
)

from adam_gpu import FusedAdam, dispatch, optim, step_signature
from adam_gpu.backends import tensor_table
from adam_gpu.quantization import SMALL_TENSOR
from adam_gpu.step_tensors import EIGHT_BIT

OPTIONS = dict(lr=1e-2, weight_decay=0.1)


@pytest.fixture
def full_checks(monkeypatch) -> list[int]:
    """The number of params of each full (per-tensor) check of a group, in order."""
    calls: list[int] = []
    original = FusedAdam._check_tensors

    def counting(self, group, params):
        calls.append(len(params))
        return original(self, group, params)

    monkeypatch.setattr(FusedAdam, "_check_tensors", counting)
    return calls


class Twins:
    """One of our optimizers and its torch.optim counterpart over equal params, stepped alike."""

    def __init__(self, kind: str, backend: str, *key: object, ours_only: dict | None = None, **options) -> None:
        self.generator = seeded_generator("step cache", kind, backend, *key)
        self.params = small_params(self.generator)
        self.expected = [p.clone() for p in self.params]
        ours, theirs = OPTIMIZERS[kind]
        self.ours = ours(self.params, backend=backend, **OPTIONS, **options, **(ours_only or {}))
        self.theirs = theirs(self.expected, foreach=False, **OPTIONS, **options)

    def step(self, count: int = 1, in_place: bool = True) -> None:
        """``count`` steps on fresh grad values: written into the grads there are (``in_place``, so that the
        tensors stay those of the last step), else new grad tensors."""
        for _ in range(count):
            if in_place and all(p.grad is not None for p in self.params):
                for param, twin in zip(self.params, self.expected, strict=True):
                    param.grad.copy_(random_tensor(self.generator, *param.shape))
                    twin.grad.copy_(param.grad)
            else:
                new_grads(self.generator, self.params, self.expected)
            self.ours.step()
            self.theirs.step()

    def assert_match(self) -> None:
        assert_optimizers_match(self.ours, self.theirs, self.params, self.expected)

    def assert_refused(self, error: type[Exception], match: str) -> None:
        before = snapshot(optimizer_tensors(self.ours))
        with pytest.raises(error, match=match):
            self.ours.step()
        assert_unchanged(before, optimizer_tensors(self.ours))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_unchanged_tensors_are_checked_once_and_step_as_torch(kind, backend, full_checks):
    twins = Twins(kind, backend)
    twins.step(5)
    assert full_checks == [2], "the steps after the first took the full checks: the cache was not used"
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_new_grad_tensors_each_step_skip_the_full_checks_and_step_as_torch(kind, backend, full_checks):
    """What ``zero_grad()`` (set_to_none) and backward give every step: new grad tensors. Their checks are
    done over the lists, and the kernels read them through the tables kept (see test_multi_tensor.py)."""
    twins = Twins(kind, backend, "new grads")
    twins.step(5, in_place=False)
    assert full_checks == [2], "new grads took the full checks"
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
def test_grads_cycling_through_more_storages_than_tables_kept_step_as_torch(backend):
    """Seven sets of grad tensors, all alive, used in turn: more than the tables kept per launch for other grads
    (tensor_table._GRAD_VARIANTS), so tables are evicted and rebuilt, and each step must read its own grads."""
    twins = Twins("adamw", backend, "cycling grads")
    grad_sets = [
        [random_tensor(twins.generator, *p.shape) for p in twins.params] for _ in range(tensor_table._GRAD_VARIANTS + 3)
    ]
    for step in range(2 * len(grad_sets)):
        for param, twin, grad in zip(twins.params, twins.expected, grad_sets[step % len(grad_sets)], strict=True):
            param.grad, twin.grad = grad, grad.clone()
        twins.ours.step()
        twins.theirs.step()
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
def test_a_new_non_contiguous_grad_after_cached_steps_is_used(backend):
    """(Its strides differ from the last grad's: TensorGuards sends the step to the full checks, and the kernels
    get a contiguous stand-in, written back.)"""
    twins = Twins("adamw", backend, "strided grad")
    twins.step(2)
    grad = random_tensor(twins.generator, 5, 3).t()  # (3, 5), column-major
    assert not grad.is_contiguous() and grad.shape == twins.params[0].shape
    twins.params[0].grad, twins.expected[0].grad = grad, grad.clone()
    twins.ours.step()
    twins.theirs.step()
    twins.step(2)
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    ("make_bad", "error", "match"),
    [
        (lambda g: random_tensor(torch.Generator().manual_seed(1), 15), ValueError, r"grad 0 has shape \(15,\)"),
        (lambda g: torch.nn.Parameter(g.clone()), None, None),
    ],
    ids=["misshapen", "parameter"],
)
def test_a_new_grad_of_another_kind_gets_the_full_checks(backend, make_bad, error, match, full_checks):
    """A new grad that the list checks do not pass (another shape, a Tensor subclass) is checked in full: refused
    with the full error, or taken when good."""
    twins = Twins("adamw", backend, "another kind", match)
    twins.step(2)
    param = twins.params[0]
    if error is not None:
        param.grad.data = make_bad(param.grad)  # (param.grad = ... refuses another shape)
        twins.assert_refused(error, match)
        return
    param.grad = make_bad(param.grad)
    twins.expected[0].grad = param.grad.detach().clone()
    twins.ours.step()
    twins.theirs.step()
    twins.assert_match()
    assert full_checks == [2, 2]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_a_state_tensor_put_in_the_state_is_used(backend, key, full_checks):
    twins = Twins("adamw", backend, key)
    twins.step(2)
    for param, twin in zip(twins.params, twins.expected, strict=True):
        replacement = twins.ours.state[param][key] * 0.5 + 0.1
        twins.ours.state[param][key] = replacement
        twins.theirs.state[twin][key] = replacement.clone()
    twins.step(2)
    twins.assert_match()
    assert full_checks == [2, 2], "one full check after the new state, then the cache again"


@pytest.mark.parametrize("backend", backend_params())
def test_hyperparameters_changed_on_the_group_are_used(backend):
    twins = Twins("adamw", backend)
    twins.step(2)
    for optimizer in (twins.ours, twins.theirs):
        optimizer.param_groups[0].update(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3, maximize=True)
    twins.step(2)
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
def test_param_data_replaced_is_used(backend):
    twins = Twins("adamw", backend)
    twins.step(2)
    for param, twin in zip(twins.params, twins.expected, strict=True):
        param.data = random_tensor(twins.generator, *param.shape)
        twin.data = param.data.clone()
    twins.step(2)
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("reshape", [lambda p: p.view(5, 3), torch.Tensor.t], ids=["view", "transposed"])
def test_param_data_reshaped_in_place_is_refused(backend, reshape):
    """The same memory seen with another shape (the address unchanged): the moments no longer fit."""
    twins = Twins("adamw", backend)
    twins.step(2)
    param = twins.params[0]
    param.data = reshape(param.data)
    param.grad = torch.zeros_like(param)
    twins.assert_refused(ValueError, r"optimizer state 0 has shape \(3, 5\) but its param has shape \(5, 3\)")


@pytest.mark.parametrize("backend", backend_params())
def test_param_data_restrided_in_place_is_used(backend):
    """The same memory and shape read in another order (column-major): a non-contiguous param now."""
    twins = Twins("adamw", backend)
    twins.step(2)
    for param in (twins.params[0], twins.expected[0]):
        param.data = param.data.as_strided((3, 5), (1, 3))
    twins.step(2)
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
def test_grad_reshaped_in_place_is_refused(backend):
    twins = Twins("adamw", backend)
    twins.step(2)
    grad = twins.params[0].grad
    grad.data = grad.data.view(5, 3)
    twins.assert_refused(ValueError, r"grad 0 has shape \(5, 3\) but its param has shape \(3, 5\)")


@pytest.mark.parametrize("backend", backend_params())
def test_moment_resized_is_refused(backend):
    twins = Twins("adamw", backend)
    twins.step(2)
    twins.ours.state[twins.params[1]]["exp_avg_sq"].resize_(6)  # (in place: the address stays)
    twins.assert_refused(ValueError, r"optimizer state 1 has shape \(6,\) but its param has shape \(7,\)")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    ("make_bad", "error", "match"),
    [
        (torch.Tensor.to_sparse, TypeError, "grad 1 is sparse"),
        (lambda g: torch.complex(g, g), TypeError, "grad 1 is complex"),
        (torch.Tensor.double, TypeError, "grad 1 has dtype torch.float64 but its param has dtype torch.float32"),
    ],
    ids=["sparse", "complex", "float64"],
)
def test_bad_grad_after_cached_steps_is_refused(backend, make_bad, error, match, full_checks):
    twins = Twins("adamw", backend, match)
    twins.step(3)
    assert full_checks == [2], "the cache was not in use before the bad grad"
    param = twins.params[1]
    if hasattr(param, "grad_dtype"):
        param.grad_dtype = None  # (torch >= 2.10 refuses a grad of another dtype unless told)
    elif make_bad is not torch.Tensor.to_sparse:
        pytest.skip("this torch refuses a grad of another dtype")
    param.grad = make_bad(param.grad)
    twins.assert_refused(error, match)


@pytest.mark.parametrize("backend", backend_params())
def test_step_counts_that_differ_within_a_group_are_each_used(backend):
    """A step count put in the state, and a param without a grad for a step, leave unequal step counts."""
    twins = Twins("adamw", backend)
    twins.step(2)
    twins.ours.state[twins.params[0]]["step"] = torch.tensor(10.0)
    twins.theirs.state[twins.expected[0]]["step"] = torch.tensor(10.0)
    twins.step(1)
    twins.params[1].grad = twins.expected[1].grad = None
    new_grads(twins.generator, twins.params[:1], twins.expected[:1])
    twins.ours.step()
    twins.theirs.step()
    twins.step(2, in_place=False)
    twins.assert_match()
    assert [float(twins.ours.state[p]["step"]) for p in twins.params] == [14.0, 5.0]


@pytest.mark.parametrize("backend", backend_params())
def test_a_group_added_after_cached_steps_steps_as_torch(backend):
    twins = Twins("adamw", backend)
    twins.step(2)
    new = random_tensor(twins.generator, 4)
    twins.params.append(new)
    twins.expected.append(new.clone())
    twins.ours.add_param_group({"params": [new], "lr": 2e-2})
    twins.theirs.add_param_group({"params": [twins.expected[-1]], "lr": 2e-2})
    twins.step(1, in_place=False)
    twins.step(2)
    twins.assert_match()
    assert [float(twins.ours.state[p]["step"]) for p in twins.params] == [5.0, 5.0, 3.0]


@pytest.mark.parametrize("backend", backend_params())
def test_a_state_dict_loaded_after_cached_steps_is_used(backend):
    twins = Twins("adamw", backend)
    twins.step(2)
    saved = copy.deepcopy(twins.theirs.state_dict())  # (a state_dict holds the live state tensors)
    twins.step(2)
    twins.ours.load_state_dict(copy.deepcopy(saved))
    twins.theirs.load_state_dict(saved)
    twins.step(2)
    twins.assert_match()


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] in ("triton", "cupy", "cuda-host")])
def test_a_cached_table_used_during_a_capture_is_kept(backend, monkeypatch):
    """Unchanged tensors captured after eager steps reuse their table: it becomes a captured one."""
    monkeypatch.setattr(tensor_table, "_tables", OrderedDict())
    monkeypatch.setattr(tensor_table, "_captured", {})
    twins = Twins("adamw", backend, ours_only={"capturable": True})
    twins.step(2)
    (key, table), *others = tensor_table._tables.items()
    assert not others and not tensor_table._captured
    monkeypatch.setattr(optim, "is_capturing", lambda device: True)
    monkeypatch.setattr(tensor_table, "is_capturing", lambda device: True)
    twins.step(1)
    assert tensor_table._captured == {key: table} and key not in tensor_table._tables
    twins.assert_match()


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] in ("triton", "cupy", "cuda-host")])
def test_a_table_of_new_grads_made_during_a_capture_is_kept(backend, monkeypatch):
    """New grads (allocated inside a captured training step) get a table of their own while capturing: the
    graph copies it from its host tensor at every replay, so it is kept for good."""
    monkeypatch.setattr(tensor_table, "_captured", {})
    twins = Twins("adamw", backend, ours_only={"capturable": True})
    twins.step(2)
    monkeypatch.setattr(optim, "is_capturing", lambda device: True)
    monkeypatch.setattr(tensor_table, "is_capturing", lambda device: True)
    twins.step(1, in_place=False)
    (table,) = tensor_table._captured.values()
    rows = table.host[: tensor_table.POINTERS_PER_TENSOR * len(twins.params)].view(len(twins.params), -1)
    assert rows[:, 1].tolist() == [p.grad.data_ptr() for p in twins.params]
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    ("make_bad", "error", "match"),
    [
        (
            lambda state: state.update(exp_avg=torch.nested.nested_tensor([state["exp_avg"].clone()])),
            TypeError,
            "state 1 is a nested tensor",
        ),
        (
            lambda state: setattr(state["exp_avg"], "data", state["exp_avg"].data.view(torch.int32)),
            TypeError,
            "state 1 has dtype torch.int32",
        ),
    ],  # fmt: skip
    ids=["nested", "int32-view"],
)
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_a_state_tensor_made_unfit_after_cached_steps_is_refused(backend, make_bad, error, match):
    """A nested tensor put in the state (torch's TensorGuards, the reused step's check, would abort the process
    on one) and a moment reinterpreted in place as int32 (same object and address, another dtype)."""
    twins = Twins("adamw", backend, match)
    twins.step(2)
    unfit = "group 0 param 1 exp_avg"
    before = snapshot(optimizer_tensors(twins.ours, but=unfit))
    make_bad(twins.ours.state[twins.params[1]])
    with pytest.raises(error, match=match):
        twins.ours.step()
    assert_unchanged(before, optimizer_tensors(twins.ours, but=unfit))


@pytest.mark.parametrize("backend", backend_params())
def test_without_torchs_tensor_guards_every_step_takes_the_full_checks(backend, full_checks, monkeypatch):
    """TensorGuards is torch's own, not public API: where a torch lacks it, nothing is reused, all still right."""
    monkeypatch.setattr(step_signature, "_tensor_guards_type", lambda: None)
    twins = Twins("adamw", backend, "no guards")
    twins.step(2)
    twins.step(2, in_place=False)
    assert full_checks == [2, 2, 2, 2]
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
def test_a_param_frozen_after_cached_steps_still_steps_with_its_grad(backend):
    """requires_grad_(False) on a param that keeps its grad (which TensorGuards may or may not see, depending on
    grad mode): torch.optim steps it, and so do we."""
    twins = Twins("adamw", backend, "frozen")
    twins.step(2)
    for param in (twins.params[0], twins.expected[0]):
        param.requires_grad_(False)
    twins.step(2)
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
def test_a_removed_group_is_forgotten_with_its_tensors(backend):
    """What a reused step keeps of a group holds its params and state: once the group leaves param_groups, the
    next step lets them go (a weak reference to a param of the removed group dies)."""
    twins = Twins("adamw", backend, "removed group")
    extra = random_tensor(twins.generator, 6)
    twins.ours.add_param_group({"params": [extra]})
    extra.grad = random_tensor(twins.generator, 6)
    twins.step(2)
    gone = weakref.ref(extra)
    twins.ours.param_groups.pop()
    twins.ours.state.pop(extra)
    del extra
    twins.step(2)
    gc.collect()
    assert gone() is None, "the removed group's param is still held"
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("drop", ["state cleared", "moment replaced", "group frozen"])
def test_state_the_user_drops_is_freed(backend, drop):
    """What a reused step keeps of its tensors holds none of them: a moment the user drops is freed at once (a
    state cleared for a reset, a moment moved elsewhere, the state of a frozen group whose other groups still
    step), not when its group next takes a full check: its memory is what the user meant to free."""
    twins = Twins("adamw", backend, "drop", drop)
    frozen = random_tensor(twins.generator, 6)
    twins.ours.add_param_group({"params": [frozen]})
    frozen.grad = random_tensor(twins.generator, 6)
    twins.step(2)
    param = frozen if drop == "group frozen" else twins.params[0]
    gone = weakref.ref(twins.ours.state[param]["exp_avg"])
    if drop == "state cleared":
        twins.ours.state[param].clear()
    elif drop == "moment replaced":
        twins.ours.state[param]["exp_avg"] = twins.ours.state[param]["exp_avg"].clone()
    else:
        frozen.grad = None
        del twins.ours.state[frozen]
        twins.ours.step()  # (the frozen group has no grad: it is not stepped)
    gc.collect()
    assert gone() is None, f"{drop}: the dropped moment is still held"


@pytest.fixture
def comparisons(monkeypatch) -> dict[str, int]:
    """How many reused steps were told apart by their state dicts' versions (``unchanged``) and how many by
    gathering and comparing their tensors (``matches``)."""
    calls = {"unchanged": 0, "matches": 0}
    for name in calls:
        original = getattr(step_signature, name)

        def counting(*args, name=name, original=original):
            calls[name] += 1
            return original(*args)

        monkeypatch.setattr(step_signature, name, counting)
    return calls


def test_this_torch_and_python_tag_dicts_as_the_reused_step_relies_on():
    """torch's reader of CPython's dict version tags passes its check here (torch 2.13), so CI runs the path
    every reused step takes; a torch or Python where it does not is served by gathering (tested below)."""
    assert step_signature._dict_version is not None


@pytest.mark.parametrize(
    "reader",
    [lambda d: 0, id, lambda d: len(d), lambda d: 1 / 0],
    ids=["constant", "identity", "length", "raising"],
)
def test_a_dict_version_reader_that_misses_a_change_or_raises_is_not_used(reader, monkeypatch):
    monkeypatch.setattr(torch._C._dynamo.guards, "dict_version", reader)
    assert step_signature._dict_version_reader() is None


@pytest.mark.parametrize("backend", backend_params())
def test_steps_on_unchanged_state_dicts_are_told_by_their_versions(backend, full_checks, comparisons):
    twins = Twins("adamw", backend, "versions")
    twins.step(3)
    twins.step(3, in_place=False)
    assert full_checks == [2] and comparisons == {"unchanged": 5, "matches": 0}
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
def test_a_state_dict_given_another_entry_is_compared_by_its_tensors_once(backend, full_checks, comparisons):
    """A dict that changed but still holds the tensors of the last full check (an entry the kernels do not read,
    added by the user): its tensors are gathered and compared, no full check, and its new version is kept."""
    twins = Twins("adamw", backend, "another entry")
    twins.step(2)
    for param in twins.params:
        twins.ours.state[param]["note"] = torch.zeros(1)
    twins.step(3)
    assert full_checks == [2] and comparisons == {"unchanged": 3, "matches": 1}
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
def test_without_a_dict_version_reader_reused_steps_gather_and_compare(backend, full_checks, comparisons, monkeypatch):
    monkeypatch.setattr(step_signature, "_dict_version", None)
    twins = Twins("adamw", backend, "no versions")
    twins.step(2)
    twins.step(2, in_place=False)
    for param, twin in zip(twins.params, twins.expected, strict=True):
        replacement = twins.ours.state[param]["exp_avg"] * 0.5
        twins.ours.state[param]["exp_avg"] = replacement
        twins.theirs.state[twin]["exp_avg"] = replacement.clone()
    twins.step(2)
    # Every step after the first compares (the one after the new moments finds them changed: a full check).
    assert full_checks == [2, 2] and comparisons == {"unchanged": 0, "matches": 5}
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
def test_a_dict_version_reader_that_fails_mid_training_leaves_steps_gathering(backend, full_checks, monkeypatch):
    """torch's reader raises on Python 3.12 where it cannot add its dict watcher: steps then gather and compare."""
    twins = Twins("adamw", backend, "reader fails")
    twins.step(2)

    def failing(state: dict) -> int:
        raise RuntimeError("failed to add version watcher to dict!")

    monkeypatch.setattr(step_signature, "_dict_version", failing)
    twins.step(2, in_place=False)
    assert full_checks == [2]
    twins.assert_match()


@pytest.mark.parametrize("backend", backend_params())
def test_a_backend_chosen_anew_between_reused_steps_runs_them(backend, full_checks, monkeypatch):
    """A reused step keeps the backend dispatch chose for it, until what it depends on changes: the optimizer's
    ``backend`` or the ADAM_GPU_BACKEND environment variable."""
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    twins = Twins("adamw", backend, "backend anew")
    twins.step(2)
    assert twins.ours.selected_backends == [backend]
    twins.ours.backend = "torch"
    twins.step(1)
    assert twins.ours.selected_backends == ["torch"]
    twins.ours.backend = "auto"
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, backend)
    twins.step(2)
    assert twins.ours.selected_backends == [backend] and full_checks == [2]
    twins.assert_match()


def _layout_run(backend: str, options: dict, steps: int = 4) -> list[torch.Tensor]:
    """Params and state after ``steps`` steps (new grads each) of one group whose params differ in layout: fp32 and
    bf16 params, small and large (with 8-bit moments, only the large ones are quantized)."""
    generator = seeded_generator("layouts", backend, *options)
    shapes_and_dtypes = [
        (5, torch.float32),
        (300, torch.bfloat16),
        (SMALL_TENSOR + 17, torch.bfloat16),
        (7, torch.bfloat16),
    ]
    params = [random_tensor(generator, size, dtype=dtype) for size, dtype in shapes_and_dtypes]
    optimizer = FusedAdam(params, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, backend=backend, **options)
    for _ in range(steps):
        for param in params:
            param.grad = random_tensor(generator, *param.shape, dtype=param.dtype)
        optimizer.step()
    return [*params, *(t for p in params for t in optimizer.state[p].values())]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("options", [{"master_weights": True}, {"state_dtype": "8bit"}], ids=["masters", "8bit"])
def test_reused_steps_of_params_of_several_layouts_equal_full_checks(backend, options, comparisons, monkeypatch):
    """Lists with some entries None (a master for the bf16 params only; absmaxes for the large ones only) and
    lists all None are rebuilt as they were gathered: bit for bit the steps that took the full checks."""
    dtypes = [torch.float32, torch.bfloat16]
    if dispatch.unavailable_reason(backend, DEVICE, dtypes, {EIGHT_BIT} if "state_dtype" in options else ()):
        pytest.skip(f"backend {backend} cannot run these params here")
    with monkeypatch.context() as without_reuse:
        without_reuse.setattr(step_signature, "_tensor_guards_type", lambda: None)
        expected = _layout_run(backend, options)
    assert comparisons == {"unchanged": 0, "matches": 0}
    reused = _layout_run(backend, options)
    assert comparisons == {"unchanged": 3, "matches": 0}
    for index, (ours, theirs) in enumerate(zip(reused, expected, strict=True)):
        assert torch.equal(ours, theirs), f"tensor {index}"
