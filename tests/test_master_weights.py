"""Master weights: bf16/fp16 params with an fp32 master copy, and bf16 params with the lean 16-bit
remainder, every backend. The master must follow the fp32 trajectory of torch.optim.AdamW on fp32
params fed the same grads; the param must be the master rounded; lean must equal the full master bit
for bit."""

from __future__ import annotations

import io

import pytest
import torch
from support import DEVICE, assert_close_relative, backend_params, seeded_generator

from adam_gpu import FusedAdamW
from adam_gpu.backends.torch import lean_master

STEPS = 12
OPTIONS = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
SHAPES = [(33, 17), (4097,), (1,), (8,)]


def _run(backend: str, dtype: torch.dtype, master_weights, generator: torch.Generator, state_dtype=None):
    start = [torch.randn(shape, generator=generator) for shape in SHAPES]
    grads = [[torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES] for _ in range(STEPS)]
    params = [p.to(dtype=dtype, device=DEVICE).requires_grad_() for p in start]
    optimizer = FusedAdamW(params, backend=backend, master_weights=master_weights, state_dtype=state_dtype, **OPTIONS)
    for step_grads in grads:
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.to(DEVICE)
        optimizer.step()
    return params, optimizer, start, grads


def _fp32_reference(start, grads) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """torch.optim.AdamW on fp32 params from the rounded bf16/fp16 start, with the same (low-precision) grads."""
    params = [p.to(DEVICE).requires_grad_() for p in start]
    optimizer = torch.optim.AdamW(params, foreach=False, **OPTIONS)
    for step_grads in grads:
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.float().to(DEVICE)
        optimizer.step()
    return params, optimizer


def _master(optimizer, param) -> torch.Tensor:
    state = optimizer.state[param]
    if "master_param" in state:
        return state["master_param"]
    return lean_master(param.detach(), state["master_remainder"])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    ("dtype", "master_weights"),
    [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, "lean")],
    ids=["bf16-fp32-master", "fp16-fp32-master", "bf16-lean"],
)
def test_master_follows_the_fp32_trajectory_and_the_param_is_its_rounding(backend, dtype, master_weights):
    generator = seeded_generator("master", backend, dtype, master_weights)
    params, optimizer, start, grads = _run(backend, dtype, master_weights, generator, state_dtype=torch.float32)
    # The reference starts from the low-precision values the params started from.
    expected, reference = _fp32_reference([p.to(dtype).float() for p in start], grads)
    for index, (param, want) in enumerate(zip(params, expected, strict=True)):
        master = _master(optimizer, param)
        assert master.dtype == torch.float32
        assert_close_relative(master, want, f"master {index}")
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_close_relative(optimizer.state[param][key], reference.state[want][key], f"{key} {index}")
        # The param is the master rounded to nearest (the lean param rounds ties up: still within half an ulp).
        if master_weights is True:
            assert torch.equal(param.detach(), master.to(dtype)), f"param {index} is not its master rounded"
        else:
            magnitude = param.detach().abs()
            ulp = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude
            assert bool(((param.float() - master).abs() <= 0.5 * ulp.float()).all())


@pytest.mark.parametrize("backend", backend_params())
def test_lean_master_is_the_full_master_bit_for_bit(backend):
    full_params, full, *_ = _run(backend, torch.bfloat16, True, seeded_generator("lean", backend))
    lean_params, lean, *_ = _run(backend, torch.bfloat16, "lean", seeded_generator("lean", backend))
    for index, (p, q) in enumerate(zip(full_params, lean_params, strict=True)):
        assert torch.equal(_master(full, p).view(torch.int32), _master(lean, q).view(torch.int32)), f"param {index}"
        assert lean.state[q]["master_remainder"].dtype == torch.int16
        state_bytes = sum(t.numel() * t.element_size() for k, t in lean.state[q].items() if k != "step")
        # bf16 moments (2 + 2) and max (2) plus a 2-byte remainder: 8 bytes a parameter.
        assert state_bytes == 8 * q.numel()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("master_weights", [True, "lean"], ids=["fp32-master", "lean"])
def test_masters_survive_state_dict(backend, master_weights):
    params, optimizer, *_ = _run(backend, torch.bfloat16, master_weights, seeded_generator("sd", backend))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    twins = [p.detach().clone().requires_grad_() for p in params]
    loaded = FusedAdamW(twins, backend=backend, master_weights=master_weights, **OPTIONS)
    loaded.load_state_dict(torch.load(buffer))
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(_master(optimizer, p).view(torch.int32), _master(loaded, q).view(torch.int32))


def test_lean_master_weights_need_bf16_params():
    with pytest.raises(TypeError, match="master_weights='lean' rebuilds fp32 from a bf16"):
        FusedAdamW([torch.zeros(3, dtype=torch.float16, device=DEVICE)], master_weights="lean")
    with pytest.raises(ValueError, match="master_weights must be False, True or 'lean'"):
        FusedAdamW([torch.zeros(3, device=DEVICE)], master_weights="fp8")
