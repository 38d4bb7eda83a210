"""FusedAdam/FusedAdamW behave as torch.optim.Adam/AdamW do: closures, zero_grad, param groups, LR
schedulers, state layout and state_dict both ways, copying, defaults; and record which backend ran."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from support import (
    DEVICE,
    OPTIMIZERS,
    assert_close_relative,
    assert_unchanged,
    backend_params,
    new_grads,
    optimizer_tensors,
    seeded_generator,
    skip_unless_backend_runs,
    small_params,
    snapshot,
)
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from adam_gpu import BackendUnavailableError, FusedAdam, FusedAdamW, dispatch
from adam_gpu.step_tensors import EIGHT_BIT

# The group options only adam-gpu has: torch.optim keeps them in a loaded state_dict and ignores them.
ADAM_GPU_GROUP_KEYS = {"state_dtype", "master_weights"}

OPTIONS = dict(lr=1e-2, weight_decay=0.1)


def _twins(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.clone() for p in params]


def _assert_same_params_and_state(ours, params, theirs, expected_params, rtol: float = 1e-6) -> None:
    for index, (param, expected) in enumerate(zip(params, expected_params, strict=True)):
        assert_close_relative(param, expected, f"param {index}", rtol=rtol)
        expected_state = theirs.state[expected]
        assert ours.state[param].keys() == expected_state.keys()
        for key, value in expected_state.items():
            assert_close_relative(ours.state[param][key], value, f"{key} of param {index}", rtol=rtol)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_closure_runs_with_grad_enabled_and_its_loss_is_returned(kind, backend):
    ours_class, torch_class = OPTIMIZERS[kind]
    generator = seeded_generator("closure", kind, backend)
    params = [p.requires_grad_() for p in small_params(generator)]
    expected = [p.detach().clone().requires_grad_() for p in params]
    targets = small_params(generator)
    optimizer = ours_class(params, backend=backend, **OPTIONS)
    expected_optimizer = torch_class(expected, foreach=False, **OPTIONS)
    grad_enabled = []

    def closure_of(optimizer, params):
        def closure() -> torch.Tensor:
            grad_enabled.append(torch.is_grad_enabled())
            optimizer.zero_grad()
            loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets, strict=True))
            loss.backward()
            return loss

        return closure

    for _ in range(3):
        loss = optimizer.step(closure_of(optimizer, params))
        expected_loss = expected_optimizer.step(closure_of(expected_optimizer, expected))
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
        assert_close_relative(loss, expected_loss.detach(), "loss")
    assert grad_enabled == [True] * 6
    _assert_same_params_and_state(optimizer, params, expected_optimizer, expected)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_step_after_zero_grad_changes_nothing(kind, backend):
    generator = seeded_generator("zero_grad", kind, backend)
    params = small_params(generator)
    optimizer = OPTIMIZERS[kind][0](params, backend=backend, **OPTIONS)
    new_grads(generator, params)
    optimizer.step()
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)
    before = snapshot(optimizer_tensors(optimizer))
    optimizer.step()
    assert_unchanged(before, optimizer_tensors(optimizer))
    assert optimizer.selected_backends == [None]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_added_param_group_keeps_its_own_options(kind, backend):
    ours_class, torch_class = OPTIMIZERS[kind]
    generator = seeded_generator("add_param_group", kind, backend)
    first, second = small_params(generator), small_params(generator)
    expected_first, expected_second = _twins(first), _twins(second)
    group_options = dict(lr=0.05, weight_decay=0.3, betas=(0.8, 0.99))
    optimizer = ours_class(first, backend=backend, **OPTIONS)
    expected_optimizer = torch_class(expected_first, foreach=False, **OPTIONS)
    optimizer.add_param_group({"params": second, **group_options})
    expected_optimizer.add_param_group({"params": expected_second, **group_options})
    for _ in range(4):
        new_grads(generator, first + second, expected_first + expected_second)
        optimizer.step()
        expected_optimizer.step()
    assert optimizer.selected_backends == [backend, backend]
    _assert_same_params_and_state(optimizer, first + second, expected_optimizer, expected_first + expected_second)


SCHEDULERS = {
    "StepLR": lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5),
    "LambdaLR": lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1 / (1 + epoch)),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_lr_scheduler_drives_the_lr_as_on_torch_optim(backend, scheduler):
    generator = seeded_generator("scheduler", backend, scheduler)
    params = small_params(generator)
    expected = _twins(params)
    optimizer = FusedAdamW(params, backend=backend, **OPTIONS)
    expected_optimizer = torch.optim.AdamW(expected, foreach=False, **OPTIONS)
    schedulers = [SCHEDULERS[scheduler](optimizer), SCHEDULERS[scheduler](expected_optimizer)]
    for _ in range(10):
        new_grads(generator, params, expected)
        optimizer.step()
        expected_optimizer.step()
        for lr_scheduler in schedulers:
            lr_scheduler.step()
        assert optimizer.param_groups[0]["lr"] == expected_optimizer.param_groups[0]["lr"]
    assert optimizer.param_groups[0]["lr"] < OPTIONS["lr"]
    _assert_same_params_and_state(optimizer, params, expected_optimizer, expected)


@pytest.mark.parametrize("backend", [*backend_params(), "auto"])
def test_selected_backends_records_each_group(backend, monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    generator = seeded_generator("selected", backend)
    with_grads, without_grads = small_params(generator), small_params(generator)
    optimizer = FusedAdamW([{"params": with_grads}, {"params": without_grads}], backend=backend)
    assert optimizer.selected_backends == []
    new_grads(generator, with_grads)
    optimizer.step()
    expected = backend
    if backend == "auto":
        expected = "torch" if DEVICE.type == "cpu" else dispatch.auto_order(DEVICE, {p.dtype for p in with_grads})[0]
    assert optimizer.selected_backends == [expected, None]


@pytest.mark.parametrize(
    ("dtypes", "features", "first"),
    [
        ({torch.float32}, (), "triton"),
        ({torch.bfloat16}, (), "cupy"),
        ({torch.float16, torch.bfloat16}, (), "cupy"),
        ({torch.float32, torch.bfloat16}, (), "triton"),  # any fp32 param: the fp32 order
        ({torch.bfloat16}, (EIGHT_BIT,), "triton"),
    ],
)
def test_auto_orders_the_cuda_backends_by_the_kind_of_step(dtypes, features, first):
    """On CUDA, auto tries first the backend the benchmark measured fastest for such a step (dispatch.AUTO_ORDER),
    then every other (state in another dtype than the params changes nothing there); on the CPU the torch backend
    (torch's fused kernel) for same-dtype state, the compiled CPU kernel first for 8-bit moments."""
    for converted_state in (False, True):
        order = dispatch.auto_order(torch.device("cuda"), dtypes, features, converted_state)
        assert order[0] == first and sorted(order) == ["cupy", "torch", "triton"]
    on_cpu = ("cpu", "torch") if features else ("torch",)
    assert dispatch.auto_order(torch.device("cpu"), dtypes, features) == on_cpu


@pytest.mark.parametrize(
    ("param_dtype", "options", "converted"),
    [
        (torch.float32, {}, False),
        (torch.bfloat16, {}, False),
        (torch.bfloat16, {"state_dtype": torch.float32}, True),
        (torch.float32, {"state_dtype": torch.bfloat16}, True),
        (torch.bfloat16, {"master_weights": True}, True),
        (torch.bfloat16, {"state_dtype": torch.float32, "master_weights": "lean"}, True),
        (torch.float32, {"master_weights": True}, False),  # (fp32 params keep no master)
    ],
)
def test_auto_on_cpu_tensors_takes_the_compiled_kernel_where_torch_fused_cannot_step(
    param_dtype, options, converted, monkeypatch
):
    """Same-dtype state: the torch backend (torch's own fused kernel); state in another dtype: the compiled CPU
    kernel, where a compiler is found (dispatch.AUTO_ORDER). The optimizer and the tensors agree on which."""
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    param = torch.randn(300, dtype=torch.float32).to(param_dtype).requires_grad_()
    param.grad = torch.randn_like(param)
    optimizer = FusedAdamW([param], **options)
    optimizer.step()
    compiled = dispatch.unavailable_reason("cpu", torch.device("cpu"), [param_dtype]) is None
    assert optimizer.selected_backends == ["cpu" if converted and compiled else "torch"]
    first = dispatch.auto_order(torch.device("cpu"), {param_dtype}, (), converted)[0]
    assert first == ("cpu" if converted else "torch")


@pytest.fixture
def failing_compiler(tmp_path, monkeypatch):
    """$CXX: a compiler that answers --version and fails every build (as one without OpenMP would)."""
    from adam_gpu.backends import cpu, host_build

    compiler = tmp_path / "c++"
    compiler.write_text('#!/bin/sh\necho "stand-in c++ 1.0"\n[ "$1" = --version ] && exit 0\n'
                        'echo "error: unsupported option -fopenmp" >&2\nexit 1\n')  # fmt: skip
    compiler.chmod(0o755)
    monkeypatch.setenv(host_build.COMPILER_ENV, str(compiler))
    monkeypatch.setenv(host_build.BUILD_CACHE_ENV, str(tmp_path / "builds"))
    caches = (cpu._entry, cpu._build_failure)
    for cache in caches:
        cache.cache_clear()
    yield compiler
    for cache in caches:  # (the real compiler's builds come back from the disk cache)
        cache.cache_clear()


def test_a_compiler_that_cannot_build_the_kernel_is_passed_over(failing_compiler, monkeypatch):
    """A compiler is found but cannot build the CPU kernel: auto steps through the torch backend, as if none were
    found, and backend="cpu" is refused with the compiler's words, nothing written."""
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    generator = seeded_generator("failing compiler")
    start = torch.randn(5000, generator=generator).to(torch.bfloat16)
    grad = torch.randn(5000, generator=generator).to(torch.bfloat16)
    stepped = {}
    for backend in ("auto", "torch"):
        param = start.clone().requires_grad_()
        param.grad = grad.clone()
        optimizer = FusedAdamW([param], state_dtype="8bit", backend=backend)
        optimizer.step()
        stepped[backend] = (param.detach(), optimizer.selected_backends)
    assert stepped["auto"][1] == ["torch"]
    assert torch.equal(stepped["auto"][0], stepped["torch"][0])
    param = start.clone().requires_grad_()
    param.grad = grad.clone()
    optimizer = FusedAdamW([param], state_dtype="8bit", backend="cpu")
    with pytest.raises(BackendUnavailableError, match=r"(?s)cannot build the CPU kernel.*unsupported option -fopenmp"):
        optimizer.step()
    assert torch.equal(param.detach(), start) and not optimizer.state[param]


def test_backend_env_var_overrides_auto(monkeypatch):
    skip_unless_backend_runs("triton")
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "triton")
    generator = seeded_generator("env var")
    params = small_params(generator)
    optimizer = FusedAdamW(params)
    new_grads(generator, params)
    optimizer.step()
    assert optimizer.selected_backends == ["triton"]


def _layout(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {key: (value.dtype, value.device, value.shape) for key, value in state.items()}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_state_layout_is_torch_optims(kind, backend, amsgrad):
    ours_class, torch_class = OPTIMIZERS[kind]
    generator = seeded_generator("layout", kind, backend, amsgrad)
    params = small_params(generator)
    expected = _twins(params)
    optimizer = ours_class(params, amsgrad=amsgrad, backend=backend)
    expected_optimizer = torch_class(expected, amsgrad=amsgrad)
    new_grads(generator, params, expected)
    optimizer.step()
    expected_optimizer.step()
    for index, (param, twin) in enumerate(zip(params, expected, strict=True)):
        assert _layout(optimizer.state[param]) == _layout(expected_optimizer.state[twin]), f"param {index}"
    ours, theirs = optimizer.state_dict(), expected_optimizer.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for group, expected_group in zip(ours["param_groups"], theirs["param_groups"], strict=True):
        # (adam-gpu's own group keys are left out at their defaults: key for key torch's, as DCP needs)
        assert group.keys() == expected_group.keys()
        assert group["params"] == expected_group["params"]


def _through_bytes(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("backend", backend_params())
def test_fp32_state_of_bf16_params_survives_state_dict(backend):
    generator = seeded_generator("fp32 state", backend)
    params = small_params(generator, torch.bfloat16)
    optimizer = FusedAdamW(params, backend=backend, state_dtype=torch.float32, **OPTIONS)
    new_grads(generator, params)
    optimizer.step()
    moments = ("exp_avg", "exp_avg_sq")
    for param in params:
        assert {optimizer.state[param][key].dtype for key in moments} == {torch.float32}

    reloaded = FusedAdamW(params, backend=backend, state_dtype=torch.float32, **OPTIONS)
    reloaded.load_state_dict(_through_bytes(optimizer.state_dict()))
    for index, param in enumerate(params):
        assert _layout(reloaded.state[param]) == _layout(optimizer.state[param]), f"param {index}"
        for key, value in optimizer.state[param].items():
            assert torch.equal(reloaded.state[param][key], value), f"{key} of param {index}"

    into_torch = torch.optim.AdamW(params, **OPTIONS)
    into_torch.load_state_dict(_through_bytes(optimizer.state_dict()))
    for index, param in enumerate(params):
        for key in moments:
            loaded = into_torch.state[param][key]
            assert loaded.dtype == torch.bfloat16, f"{key} of param {index}"
            assert torch.equal(loaded, optimizer.state[param][key].bfloat16()), f"{key} of param {index}"
    into_torch.step()


@pytest.mark.parametrize("backend", backend_params())
def test_state_dict_of_torch_fused_adamw_loads_with_step_on_the_host(backend):
    """Loaded, the state goes on as torch's for-loop AdamW goes on from it (within 1e-6), and as torch's fused
    one does, within the fused one's own error: on CUDA it rounds the betas to fp32 (1.3e-5 in a second moment
    grown from zero at beta2 = 0.999, measured on an H200; see support.TORCH_SAME_STEP_RTOL)."""
    generator = seeded_generator("fused state", backend)
    expected = small_params(generator)
    fused = torch.optim.AdamW(expected, fused=True, **OPTIONS)
    new_grads(generator, expected)
    fused.step()
    params, for_loop_params = _twins(expected), _twins(expected)
    assert fused.state[expected[0]]["step"].device == expected[0].device
    optimizer = FusedAdamW(params, backend=backend, **OPTIONS)
    optimizer.load_state_dict(_through_bytes(fused.state_dict()))
    for_loop = torch.optim.AdamW(for_loop_params, foreach=False, **OPTIONS)
    for_loop.load_state_dict(_through_bytes(fused.state_dict()))
    for group in for_loop.param_groups:  # (the loaded groups say fused=True: torch would step fused again)
        group.update(fused=False, foreach=False)
    for index, param in enumerate(params):
        step = optimizer.state[param]["step"]
        assert (step.dtype, step.device, step.shape, float(step)) == (torch.float32, torch.device("cpu"), (), 1.0), (
            f"step of param {index}"
        )
    for _ in range(3):
        new_grads(generator, params, expected, for_loop_params)
        for stepped in (optimizer, fused, for_loop):
            stepped.step()
    _assert_same_params_and_state(optimizer, params, for_loop, for_loop_params)
    fused_rtol = 1e-6 if DEVICE.type == "cpu" else 1e-4
    _assert_same_params_and_state(optimizer, params, fused, expected, rtol=fused_rtol)


# torch.optim.Optimizer.__getstate__ keeps only defaults, state and param_groups.


def _deepcopy(optimizer: FusedAdam) -> tuple[FusedAdam, list[torch.Tensor]]:
    twin = copy.deepcopy(optimizer)
    return twin, twin.param_groups[0]["params"]


def _pickle(optimizer: FusedAdam) -> tuple[FusedAdam, list[torch.Tensor]]:
    twin = pickle.loads(pickle.dumps(optimizer))
    return twin, twin.param_groups[0]["params"]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("how", [_deepcopy, _pickle], ids=["deepcopy", "pickle"])
def test_copied_optimizer_steps_as_the_original(kind, backend, how):
    generator = seeded_generator("copy", kind, backend, how.__name__)
    params = small_params(generator)
    optimizer = OPTIMIZERS[kind][0](params, backend=backend, **OPTIONS)
    new_grads(generator, params)
    optimizer.step()
    twin, twin_params = how(optimizer)
    assert twin.backend == backend and all(t is not p for t, p in zip(twin_params, params, strict=True))
    for _ in range(2):
        new_grads(generator, params, twin_params)
        optimizer.step()
        twin.step()
    assert twin.selected_backends == optimizer.selected_backends == [backend]
    for index, (param, copied) in enumerate(zip(params, twin_params, strict=True)):
        assert torch.equal(param, copied), f"param {index}"
        for key, value in optimizer.state[param].items():
            assert torch.equal(twin.state[copied][key], value), f"{key} of param {index}"


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_defaults_are_torch_optims(kind):
    ours_class, torch_class = OPTIMIZERS[kind]
    params = small_params(seeded_generator("defaults", kind))
    ours, theirs = ours_class(params).defaults, torch_class(params).defaults
    assert ours.keys() == theirs.keys() | ADAM_GPU_GROUP_KEYS
    assert {key: ours[key] for key in theirs} == theirs
    assert ours["state_dtype"] is None and ours["master_weights"] is False
    assert ours["weight_decay"] == (1e-2 if kind == "adamw" else 0)


class _Subclassed(FusedAdamW):
    """A user's subclass overriding step (torch.optim then wraps that step in the hooks)."""

    def step(self, closure=None):
        return super().step(closure)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("cls", [FusedAdamW, _Subclassed], ids=["FusedAdamW", "subclass"])
def test_step_hooks_run_once_each_step_as_on_torch_optim(backend, cls):
    generator = seeded_generator("hooks", backend, cls.__name__)
    params = [p.requires_grad_() for p in small_params(generator)]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator).to(DEVICE)
    optimizer = cls(params, backend=backend, **OPTIONS)
    calls: list[str] = []
    before = {}

    def pre_hook(opt, args, kwargs):
        calls.append("pre")
        before["step"] = {p: opt.state[p]["step"].item() for p in params if p in opt.state}

    handles = [
        optimizer.register_step_pre_hook(pre_hook),
        optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post")),
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append("global post")),
    ]
    try:
        for count in (1, 2, 3):
            optimizer.step()
            assert calls == ["global pre", "pre", "post", "global post"] * count
            assert all(optimizer.state[p]["step"].item() == count for p in params)
        assert set(before["step"].values()) == {2.0}, "the pre hook runs before the step"
    finally:
        for handle in handles:
            handle.remove()
    optimizer.step()  # without hooks: nothing more is called
    assert len(calls) == 12


@pytest.mark.parametrize("backend", backend_params())
def test_the_profiler_sees_the_step_as_torch_optims(backend):
    generator = seeded_generator("profiled", backend)
    params = [p.requires_grad_() for p in small_params(generator)]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator).to(DEVICE)
    optimizer = FusedAdamW(params, backend=backend, **OPTIONS)
    optimizer.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.step()
    names = [event.name for event in profile.events()]
    assert names.count("Optimizer.step#FusedAdamW.step") == 1


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "change",
    [
        ("lr", 3e-3),
        ("betas", (0.8, 0.99)),
        ("eps", 1e-3),
        ("weight_decay", 0.5),
        ("maximize", True),
        ("lr", torch.tensor(4e-3)),  # a tensor lr (not capturable) is read at each step
    ],
    ids=["lr", "betas", "eps", "weight_decay", "maximize", "tensor-lr"],
)
def test_a_hyperparameter_changed_between_steps_is_the_next_steps(backend, change):
    key, value = change
    generator = seeded_generator("hyperparameter", backend, key)
    params = [p.requires_grad_() for p in small_params(generator)]
    expected = [p.detach().clone().requires_grad_() for p in params]
    ours, theirs = FusedAdamW(params, backend=backend, **OPTIONS), torch.optim.AdamW(expected, foreach=False, **OPTIONS)
    for step in range(4):
        if step == 2:
            for optimizer in (ours, theirs):
                optimizer.param_groups[0][key] = value
        if step == 3 and isinstance(value, torch.Tensor):
            value.fill_(1e-3)  # changed in place: the same object
        new_grads(generator, params, expected)
        ours.step()
        theirs.step()
        _assert_same_params_and_state(ours, params, theirs, expected, rtol=1e-5)
