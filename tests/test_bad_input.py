"""Bad inputs: each gets an error naming the problem and leaves params, grads and optimizer state bitwise
untouched (all groups are checked before any is written); and the unusual inputs that are not errors
(non-contiguous, grad-less and empty params) are updated correctly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from support import (
    DEVICE,
    OPTIMIZERS,
    SMALL_SHAPES,
    assert_close_relative,
    assert_correctly_rounded,
    assert_unchanged,
    backend_params,
    new_grads,
    optimizer_tensors,
    random_tensor,
    seeded_generator,
    skip_unless_backend_runs,
    small_params,
    snapshot,
)

from adam_gpu import BackendUnavailableError, FusedAdam, FusedAdamW, dispatch, fused_adam

# (group key, bad value, what the message says): torch.optim.Adam rejects the same values.
BAD_HYPERPARAMETERS = [
    pytest.param("lr", -1e-3, "Invalid learning rate", id="lr-negative"),
    pytest.param("eps", -1e-8, "Invalid epsilon", id="eps-negative"),
    pytest.param("weight_decay", -0.1, "Invalid weight_decay", id="weight_decay-negative"),
    pytest.param("betas", (1.0, 0.999), "beta parameter at index 0", id="beta1-one"),
    pytest.param("betas", (-0.1, 0.999), "beta parameter at index 0", id="beta1-negative"),
    pytest.param("betas", (0.9, 1.0), "beta parameter at index 1", id="beta2-one"),
    pytest.param("betas", (0.9, -0.5), "beta parameter at index 1", id="beta2-negative"),
    pytest.param("state_dtype", torch.float16, "state_dtype must be", id="state_dtype-fp16"),
    pytest.param("state_dtype", "4bit", "state_dtype must be", id="state_dtype-4bit"),
]


def _stepped(kind: str, backend: str, generator: torch.Generator, groups: list | None = None, **options) -> FusedAdam:
    """An optimizer over ``groups`` (default: one group of ``_params``) after one step (so every param
    has state), holding fresh grads for the next."""
    optimizer = OPTIMIZERS[kind][0](groups or small_params(generator), lr=1e-2, backend=backend, **options)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    new_grads(generator, params)
    optimizer.step()
    new_grads(generator, params)
    return optimizer


def _assert_step_refused(optimizer: FusedAdam, error: type[Exception], match: str) -> None:
    """step() raises ``error`` matching ``match`` and writes nothing."""
    before = snapshot(optimizer_tensors(optimizer))
    with pytest.raises(error, match=match):
        optimizer.step()
    assert_unchanged(before, optimizer_tensors(optimizer))


def _allow_any_grad_dtype(param: torch.Tensor) -> None:
    """Let ``param.grad`` take another dtype than ``param`` (torch >= 2.10: ``grad_dtype = None``)."""
    if not hasattr(param, "grad_dtype"):
        pytest.skip("this torch refuses a grad of another dtype; the functional API tests cover the check")
    param.grad_dtype = None


# ---- grads the kernels cannot take, found at step() ----

GRAD_CASES = {
    "sparse": (TypeError, "grad 1 is sparse .*consider torch.optim.SparseAdam", lambda g: g.to_sparse()),
    "complex": (TypeError, "grad 1 is complex", lambda g: torch.complex(g, g)),
    "float64": (TypeError, "grad 1 has dtype torch.float64 but its param has dtype torch.float32", torch.Tensor.double),
    "bfloat16": (
        TypeError,
        "grad 1 has dtype torch.bfloat16 but its param has dtype torch.float32",
        torch.Tensor.bfloat16,
    ),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_bad_grad_is_refused_at_step(kind, backend, case):
    error, match, make_bad = GRAD_CASES[case]
    optimizer = _stepped(kind, backend, seeded_generator("bad grad", kind, backend, case))
    param = optimizer.param_groups[0]["params"][1]
    if case != "sparse":
        _allow_any_grad_dtype(param)
    param.grad = make_bad(param.grad)
    _assert_step_refused(optimizer, error, match)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_one_group_on_two_devices_is_refused(kind, backend):
    generator = seeded_generator("two devices", kind, backend)
    params = small_params(generator)
    elsewhere = torch.empty(4, device="meta")  # a second device on any machine
    optimizer = OPTIMIZERS[kind][0]([*params, elsewhere], lr=1e-2, backend=backend)
    new_grads(generator, params)
    optimizer.step()  # `elsewhere` has no grad yet: skipped
    new_grads(generator, params)
    elsewhere.grad = torch.empty(4, device="meta")
    _assert_step_refused(optimizer, ValueError, "one device")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_bad_group_among_good_ones_writes_no_group(kind, backend):
    generator = seeded_generator("bad group", kind, backend)
    optimizer = _stepped(
        kind, backend, generator, [{"params": small_params(generator)}, {"params": small_params(generator)}]
    )
    bad = optimizer.param_groups[1]["params"][0]
    bad.grad = bad.grad.to_sparse()
    _assert_step_refused(optimizer, TypeError, "grad 0 is sparse")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize(("key", "value", "match"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_set_after_construction_is_refused_at_step(kind, backend, key, value, match):
    optimizer = _stepped(kind, backend, seeded_generator("bad group value", kind, backend, key, value))
    optimizer.param_groups[0][key] = value
    _assert_step_refused(optimizer, ValueError, match)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_moment_of_wrong_shape_set_in_the_state_is_refused_at_step(kind, backend):
    # (load_state_dict refuses such a state itself: tests/test_checkpoint.py.)
    generator = seeded_generator("wrong shape state", kind, backend)
    optimizer = _stepped(kind, backend, generator)
    second = optimizer.param_groups[0]["params"][1]
    optimizer.state[second]["exp_avg"] = random_tensor(generator, SMALL_SHAPES[1][0] + 1)
    _assert_step_refused(optimizer, ValueError, r"optimizer state 1 has shape \(8,\) but its param has shape \(7,\)")


# ---- construction and add_param_group ----


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize(("key", "value", "match"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_is_refused_at_construction(kind, key, value, match):
    with pytest.raises(ValueError, match=match):
        OPTIMIZERS[kind][0](small_params(seeded_generator("construct", kind, key, value)), **{key: value})


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize(("key", "value", "match"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_in_add_param_group_adds_no_group(kind, backend, key, value, match):
    generator = seeded_generator("add group", kind, backend, key, value)
    optimizer = _stepped(kind, backend, generator)
    new = random_tensor(generator, 6)
    before = snapshot(optimizer_tensors(optimizer))
    with pytest.raises(ValueError, match=match):
        optimizer.add_param_group({"params": [new], key: value})
    assert_unchanged(before, optimizer_tensors(optimizer))
    # The refused param is not half-registered: it can still join with good values and step.
    optimizer.add_param_group({"params": [new]})
    new_grads(generator, [new])
    optimizer.step()
    assert len(optimizer.param_groups) == 2 and float(optimizer.state[new]["step"]) == 1


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize(
    ("bad", "dtype"), [(torch.arange(4), "torch.int64"), (torch.ones(4, dtype=torch.complex64), "torch.complex64")]
)
def test_param_that_is_not_real_floating_point_is_refused_at_construction(kind, bad, dtype):
    good = small_params(seeded_generator("construct dtype", kind, dtype))
    with pytest.raises(TypeError, match=f"param 2 has dtype {dtype}: adam-gpu updates real floating-point"):
        OPTIMIZERS[kind][0]([*good, bad.to(DEVICE)])


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"differentiable": True, "master_weights": True}, "master_weights and max_grad_norm are not available"),
        ({"differentiable": True, "backend": "triton"}, "use backend 'auto', not 'triton'"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be a positive number"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a positive number"),
        ({"backend": "cuda-c"}, "unknown backend 'cuda-c'; choose one of: " + ", ".join(["auto", *dispatch.BACKENDS])),
    ],
    ids=[
        "differentiable-masters",
        "differentiable-triton",
        "max_grad_norm-zero",
        "max_grad_norm-negative",
        "unknown-backend",
    ],
)
def test_unsupported_option_is_refused_at_construction(kind, options, match):
    with pytest.raises(ValueError, match=match):
        OPTIMIZERS[kind][0](small_params(seeded_generator("construct option", kind, options)), **options)


# ---- backends that cannot run ----


def test_triton_on_cpu_without_interpreter_is_unavailable():
    """A fresh interpreter without TRITON_INTERPRET: an explicit backend="triton" on CPU tensors fails
    at step() with the reason, writing nothing. (A subprocess: the variable is read once, at import.)"""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch
        from adam_gpu import BackendUnavailableError, FusedAdamW
        param = torch.randn(5)
        param.grad = torch.randn(5)
        before = param.clone()
        optimizer = FusedAdamW([param], backend="triton")
        try:
            optimizer.step()
        except BackendUnavailableError as error:
            assert torch.equal(param, before) and not optimizer.state
            print(error)
        """
    )
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("backend triton unavailable:"), result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout


@pytest.fixture
def uninstalled_backend(monkeypatch) -> str:
    """A registered backend whose package is not installed, listed first in every auto order."""
    name = "fake"
    backend = dispatch.Backend(name, "adam_gpu.backends.fake", requires="not_a_real_package_xyz", install_hint="hint")
    monkeypatch.setitem(dispatch.BACKENDS, name, backend)
    monkeypatch.setattr(dispatch, "DEFAULT_AUTO_ORDER", (name, *dispatch.DEFAULT_AUTO_ORDER))
    for device_type, order in list(dispatch.AUTO_ORDER.items()):
        monkeypatch.setitem(dispatch.AUTO_ORDER, device_type, (name, *order))
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    return name


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_uninstalled_backend_names_the_package_and_auto_skips_it(kind, uninstalled_backend):
    """auto steps past a backend that is not installed; asked for by name, it is refused when the optimizer is
    built, not at its first step."""
    generator = seeded_generator("uninstalled", kind)
    optimizer = _stepped(kind, "auto", generator)
    assert optimizer.selected_backends[0] in dispatch.BACKENDS
    assert optimizer.selected_backends[0] != uninstalled_backend
    match = "^backend fake unavailable: not_a_real_package_xyz is not installed \\(hint\\)$"
    with pytest.raises(BackendUnavailableError, match=match):
        OPTIMIZERS[kind][0](optimizer.param_groups[0]["params"], backend=uninstalled_backend)


# ---- the environment variable that replaces backend="auto" ----

ENV_NAMES = "chosen by the environment variable ADAM_GPU_BACKEND=fake, which replaces backend='auto'"


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_unknown_backend_in_the_environment_is_refused_at_construction(kind, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "bogus")
    params = small_params(seeded_generator("env bogus", kind))
    match = "^unknown backend 'bogus' in the environment variable ADAM_GPU_BACKEND .*; choose one of: auto, "
    with pytest.raises(ValueError, match=match):
        OPTIMIZERS[kind][0](params)
    with pytest.raises(ValueError, match=match):
        fused_adam([], [], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0)
    OPTIMIZERS[kind][0](params, backend="torch")  # a backend named in the call is not replaced: no error


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_uninstalled_backend_in_the_environment_is_refused_at_construction_saying_so(
    kind, uninstalled_backend, monkeypatch
):
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, uninstalled_backend)
    params = small_params(seeded_generator("env uninstalled", kind))
    with pytest.raises(BackendUnavailableError, match=f"^backend fake unavailable: .* \\({ENV_NAMES}\\)$"):
        OPTIMIZERS[kind][0](params)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_backend_the_environment_chose_that_cannot_run_says_so(kind, monkeypatch):
    """A backend that is installed but cannot step these tensors (float64) is refused at the step, naming the
    variable that chose it."""
    name = next((name for name in ("triton", "cupy") if dispatch.unavailable_reason(name, DEVICE, ()) is None), None)
    if name is None:
        pytest.skip("neither kernel backend is importable here")
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    generator = seeded_generator("env float64", kind)
    optimizer = _stepped(kind, "auto", generator, [p.double() for p in small_params(generator)])
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, name)
    match = f"^backend {name} unavailable: .*float64 \\({ENV_NAMES.replace('fake', name)}\\)$"
    _assert_step_refused(optimizer, BackendUnavailableError, match)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_float64_on_triton_is_unavailable(kind):
    skip_unless_backend_runs("triton")
    generator = seeded_generator("float64 triton", kind)
    params = [p.double() for p in small_params(generator)]
    optimizer = _stepped(kind, "auto", generator, params)
    optimizer.backend = "triton"
    _assert_step_refused(optimizer, BackendUnavailableError, "^backend triton unavailable: .*float64")


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_float64_on_auto_runs_the_torch_backend_and_matches_torch_optim(kind, amsgrad, monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    ours_class, torch_class = OPTIMIZERS[kind]
    generator = seeded_generator("float64 auto", kind, amsgrad)
    params = [p.double() for p in small_params(generator)]
    expected = [p.clone() for p in params]
    options = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    optimizer = ours_class(params, **options)
    expected_optimizer = torch_class(expected, foreach=False, **options)
    for _ in range(5):
        new_grads(generator, params, expected)
        optimizer.step()
        expected_optimizer.step()
        assert optimizer.selected_backends == ["torch"]
    for index, (param, twin) in enumerate(zip(params, expected, strict=True)):
        assert_close_relative(param, twin, f"param {index}", rtol=1e-12)
        for key, value in expected_optimizer.state[twin].items():
            assert_close_relative(optimizer.state[param][key], value, f"{key} {index}", rtol=1e-12)


# ---- the functional API ----


def _functional_inputs(generator: torch.Generator, amsgrad: bool = True) -> dict[str, list]:
    params = small_params(generator)
    return {
        "params": params,
        "grads": [random_tensor(generator, *p.shape) for p in params],
        "exp_avgs": [0.3 * random_tensor(generator, *p.shape) for p in params],
        "exp_avg_sqs": [random_tensor(generator, *p.shape).square() for p in params],
        "max_exp_avg_sqs": [random_tensor(generator, *p.shape).square() + 1 for p in params] if amsgrad else [],
        "state_steps": [torch.tensor(3.0) for _ in params],
    }


def _named(inputs: dict[str, list]) -> dict[str, object]:
    return {f"{key}[{index}]": t for key, tensors in inputs.items() for index, t in enumerate(tensors)}


def _assert_functional_refused(inputs: dict[str, list], backend: str, error: type[Exception], match: str) -> None:
    before = snapshot(_named(inputs))
    with pytest.raises(error, match=match):
        fused_adam(**inputs, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True, backend=backend)
    assert_unchanged(before, _named(inputs))


def _on_meta(inputs: dict[str, list]) -> None:
    for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        inputs[key][1] = torch.empty_like(inputs[key][1], device="meta")


def _replace(key: str, index: int, change):
    """Spoils the inputs by replacing ``inputs[key][index]`` with ``change`` of it."""

    def spoil(inputs: dict[str, list]) -> None:
        inputs[key][index] = change(inputs[key][index])

    return spoil


FUNCTIONAL_CASES = {
    "sparse-grad": (TypeError, "grad 1 is sparse", _replace("grads", 1, torch.Tensor.to_sparse)),
    "complex-grad": (TypeError, "grad 1 is complex", _replace("grads", 1, lambda grad: grad * 1j)),
    "float64-grad": (TypeError, "grad 1 has dtype torch.float64", _replace("grads", 1, torch.Tensor.double)),
    "grad-shape": (ValueError, r"grad 0 has shape \(5, 3\)", _replace("grads", 0, torch.Tensor.t)),
    "moment-shape": (ValueError, r"state 1 has shape \(6,\)", _replace("exp_avg_sqs", 1, lambda v: v[:6])),
    "integer-moment": (TypeError, "state 0 has dtype torch.int64", _replace("exp_avgs", 0, torch.Tensor.long)),
    "two-devices": (ValueError, "one device", _on_meta),
    "short-grads": (ValueError, "2 params but 1 grads", lambda i: i["grads"].pop()),
    "short-exp_avgs": (ValueError, "2 params but 1 exp_avgs", lambda i: i["exp_avgs"].pop()),
    "short-max_exp_avg_sqs": (ValueError, "2 params but 1 max_exp_avg_sqs", lambda i: i["max_exp_avg_sqs"].pop()),
    "long-state_steps": (ValueError, "2 params but 3 state_steps", lambda i: i["state_steps"].append(torch.ones(()))),
    "float-state_step": (TypeError, r"state_steps\[1\] must be a 1-element tensor", _replace("state_steps", 1, float)),
    "pair-state_step": (
        TypeError,
        r"state_steps\[0\] must be a 1-element",
        _replace("state_steps", 0, lambda s: s.expand(2)),
    ),
    "unknown-backend": (ValueError, "unknown backend 'cuda-c'; choose one of: auto, ", lambda i: None),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", FUNCTIONAL_CASES)
def test_functional_bad_input_is_refused(backend, case):
    error, match, spoil = FUNCTIONAL_CASES[case]
    inputs = _functional_inputs(seeded_generator("functional", backend, case))
    spoil(inputs)
    _assert_functional_refused(inputs, "cuda-c" if case == "unknown-backend" else backend, error, match)


def test_functional_unknown_backend_is_refused_without_params():
    with pytest.raises(ValueError, match="unknown backend 'cuda-c'"):
        fused_adam([], [], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0, backend="cuda-c")


# ---- unusual inputs that are not errors ----


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_non_contiguous_params_are_updated_in_place(backend, dtype):
    """A strided slice and a transposed view, each updated in place as torch.optim.AdamW updates a
    contiguous copy; the elements of the slice's buffer outside it stay as they were.

    fp32: three steps within fp32 rounding of torch. bf16 (torch's bf16 math rounds at every operation,
    ours once): the first step is torch's fp32 step correctly rounded, the next two are bitwise those of
    FusedAdamW on contiguous copies."""
    generator = seeded_generator("non-contiguous", backend, dtype)
    big = random_tensor(generator, 5, 8, dtype=dtype)
    outside = big[:, 1::2].clone()
    params = [big[:, ::2], random_tensor(generator, 6, 3, dtype=dtype).t()]
    assert not any(p.is_contiguous() for p in params)
    contiguous = [p.clone(memory_format=torch.contiguous_format) for p in params]
    expected = [p.to(torch.float32, memory_format=torch.contiguous_format, copy=True) for p in params]
    options = dict(lr=1e-2, weight_decay=0.1)
    optimizers = [FusedAdamW(params, backend=backend, **options), FusedAdamW(contiguous, backend=backend, **options)]
    expected_optimizer = torch.optim.AdamW(expected, foreach=False, **options)
    for step in range(3):
        new_grads(generator, params, contiguous, expected)
        for optimizer in optimizers:
            optimizer.step()
        if dtype == torch.float32 or step == 0:
            expected_optimizer.step()
            for index, (param, oracle) in enumerate(zip(params, expected, strict=True)):
                if dtype == torch.float32:
                    assert_close_relative(param, oracle, f"param {index} step {step}")
                else:
                    assert_correctly_rounded(param.flatten(), oracle.double().flatten(), f"param {index} step {step}")
    for index, (param, twin) in enumerate(zip(params, contiguous, strict=True)):
        assert torch.equal(param, twin), f"param {index}: the strided update differs from the contiguous one"
        for key, value in optimizers[1].state[twin].items():
            assert torch.equal(optimizers[0].state[param][key], value), f"{key} of param {index}"
    assert torch.equal(big[:, 1::2], outside), "elements outside the strided param were written"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_params_without_grads_are_skipped(kind, backend):
    generator = seeded_generator("no grad", kind, backend)
    params = small_params(generator)
    idle = random_tensor(generator, 4)
    idle_before = idle.clone()
    optimizer = OPTIMIZERS[kind][0]([params[0], idle, params[1]], lr=1e-2, backend=backend)
    for _ in range(2):
        new_grads(generator, params)
        optimizer.step()
    assert idle not in optimizer.state and idle.grad is None
    assert torch.equal(idle, idle_before)
    assert [float(optimizer.state[p]["step"]) for p in params] == [2.0, 2.0]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_zero_element_param_takes_a_step(kind, backend, amsgrad):
    ours_class, torch_class = OPTIMIZERS[kind]
    generator = seeded_generator("empty", kind, backend, amsgrad)
    params = [random_tensor(generator, 0), random_tensor(generator, 5), random_tensor(generator, 3, 0)]
    expected = [p.clone() for p in params]
    optimizer = ours_class(params, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, backend=backend)
    expected_optimizer = torch_class(expected, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, foreach=False)
    new_grads(generator, params, expected)
    optimizer.step()
    expected_optimizer.step()
    for index, (param, twin) in enumerate(zip(params, expected, strict=True)):
        if param.numel():
            assert_close_relative(param, twin, f"param {index}")
        state, expected_state = optimizer.state[param], expected_optimizer.state[twin]
        assert state.keys() == expected_state.keys()
        assert all(state[key].shape == value.shape for key, value in expected_state.items())
        assert float(state["step"]) == 1
