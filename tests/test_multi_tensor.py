"""One launch updates a whole group: many tensors of odd sizes, mixed dtypes and step counts, some
non-contiguous, every one against the float64 reference; launches counted; tensor tables cached."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from support import (
    ALIGNED_GUARD,
    DEVICE,
    GUARD,
    StepCase,
    assert_close_relative,
    assert_correctly_rounded,
    backend_params,
    guarded,
    guards_intact,
    seeded_generator,
)

from adam_gpu import FusedAdamW, dispatch, fused_adam
from adam_gpu.backends import tensor_table
from adam_gpu.hyperparameters import AdamHyperparameters

# Backends that update a group through tensor tables (the torch backend uses torch._foreach_* instead).
TABLE_BACKENDS = ("triton", "cupy", "cuda-host")
SIZES = [1, 2, 3, 7, 31, 127, 257, 1021, 4095, 4096, 4097, 8191, 65537, 100_003]
HP = AdamHyperparameters(1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled=True, amsgrad=True, maximize=True)


def _step(backend, params, grads, moments, steps):
    return fused_adam(
        params, grads, *moments, steps,
        lr=HP.lr, beta1=HP.beta1, beta2=HP.beta2, eps=HP.eps, weight_decay=HP.weight_decay,
        decoupled=HP.decoupled, amsgrad=HP.amsgrad, maximize=HP.maximize, backend=backend,
    )  # fmt: skip


class Launches(list):
    """(param dtype, moment dtype, tensor count) of each launch group, and its table in ``tables``."""

    tables: list[tensor_table.TensorTable]


@pytest.fixture
def launches(monkeypatch):
    """Every launch group the table backends build (see Launches)."""
    seen = Launches()
    seen.tables = []
    original = tensor_table.launch_groups

    def recording(*args, **kwargs):
        context = original(*args, **kwargs)

        class Recorder:
            def __enter__(self):
                groups = context.__enter__()
                seen.extend((g.param_dtype, g.state_dtype, g.table.n_tensors) for g in groups)
                seen.tables.extend(g.table for g in groups)
                return groups

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Recorder()

    monkeypatch.setattr(tensor_table, "launch_groups", recording)
    return seen


def _policy_cases(backend: str, generator: torch.Generator):
    """(param dtype, moment dtype, step, case) for each tensor: three storage policies, two step counts."""
    policies = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
    for index, size in enumerate(SIZES * 2):
        param_dtype, state_dtype = policies[index % len(policies)]
        case = StepCase.draw(size, generator).rounded(param_dtype, state_dtype)
        case.step = 3 if index < len(SIZES) else 11
        yield param_dtype, state_dtype, case


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("guard", [GUARD, ALIGNED_GUARD], ids=["misaligned", "aligned"])
def test_many_tensors_of_mixed_policies_in_one_call(backend, guard, launches):
    """Misaligned views take the kernels' scalar path; aligned ones take the vector path in whole chunks (the
    Triton kernel's, chunk by chunk; the CUDA C kernel's, tensor by tensor), the scalar path at their ends."""
    cases = list(_policy_cases(backend, seeded_generator("multi", backend, guard)))
    params, grads, moments, steps, buffers = [], [], ([], [], []), [], []
    for index, (param_dtype, state_dtype, case) in enumerate(cases):
        param, buffer = guarded(case.param, param_dtype, guard)
        if index % 5 == 4 and case.param.numel() % 2 == 0:  # some params are non-contiguous views
            wide = torch.full((case.param.numel(), 2), float("nan"), dtype=param_dtype, device=DEVICE)
            param = wide[:, 0]
            param.copy_(case.param)
            buffer = None
        grad, grad_buffer = guarded(case.grad, param_dtype, guard)
        params.append(param)
        grads.append(grad)
        buffers += [b for b in (buffer, grad_buffer) if b is not None]
        for moment, values in zip(moments, (case.exp_avg, case.exp_avg_sq, case.max_exp_avg_sq), strict=True):
            view, moment_buffer = guarded(values, state_dtype, guard)
            moment.append(view)
            buffers.append(moment_buffer)
        steps.append(torch.tensor(float(case.step - 1)))

    assert _step(backend, params, grads, moments, steps) == backend
    assert all(guards_intact(buffer) for buffer in buffers), "a launch wrote outside its tensors"
    for index, (_, _, case) in enumerate(cases):
        expected = case.reference(HP)
        actual = (params[index], moments[0][index], moments[1][index], moments[2][index])
        for name, value in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), actual, strict=True):
            check = assert_close_relative if value.dtype == torch.float32 else assert_correctly_rounded
            check(value, getattr(expected, name), f"tensor {index} ({value.dtype}) {name}", getattr(case, name))
    if backend in TABLE_BACKENDS:
        # One launch per (param dtype, moment dtype, step count): 3 policies x 2 step counts.
        assert len(launches) == 6 and sum(count for *_, count in launches) == len(cases)


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] in TABLE_BACKENDS])
def test_a_group_of_148_tensors_is_one_launch_and_its_table_is_built_once(backend, launches, monkeypatch):
    monkeypatch.setattr(tensor_table, "_tables", OrderedDict())  # other tests' tables must not evict ours
    generator = seeded_generator("launches", backend)
    params = [torch.randn(n, generator=generator).to(DEVICE).requires_grad_() for n in (SIZES * 11)[:148]]
    optimizer = FusedAdamW(params, lr=1e-3, backend=backend)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    tables_after_first_step = dict(tensor_table._tables)
    optimizer.step()
    assert launches == [(torch.float32, torch.float32, 148)] * 2
    assert tensor_table._tables == tables_after_first_step, "the second step rebuilt the table"
    params[5].grad = params[5].grad.clone()  # a new grad storage: the table must follow it
    optimizer.step()
    table, width = launches.tables[-1], tensor_table.POINTERS_PER_TENSOR
    rows = table.host[: width * 148].view(148, width)
    assert rows[:, :2].tolist() == [[p.data_ptr(), p.grad.data_ptr()] for p in params]
    assert table.pointers.tolist() == rows.tolist()


def test_table_backends_are_registered():
    assert set(TABLE_BACKENDS) <= set(dispatch.BACKENDS)
