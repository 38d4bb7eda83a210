"""Inputs read on the device: the capturable mode (step counts and lr on the device), torch.amp.GradScaler
(scale and found_inf handed to the kernels) and fused gradient clipping, every backend, against torch.optim
driven the usual way (clip_grad_norm_, GradScaler's own unscale and skip)."""

from __future__ import annotations

import pytest
import torch
from support import DEVICE, assert_close_relative, backend_params, seeded_generator, small_params

from adam_gpu import FusedAdamW

STEPS = 6
OPTIONS = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)


def _grads(generator: torch.Generator, params: list[torch.Tensor], steps: int, scale: float = 1.0) -> list[list]:
    return [[scale * torch.randn(p.shape, generator=generator).to(DEVICE) for p in params] for _ in range(steps)]


def _assert_same(ours: FusedAdamW, params, theirs: torch.optim.Optimizer, expected_params) -> None:
    for index, (param, expected) in enumerate(zip(params, expected_params, strict=True)):
        assert_close_relative(param, expected, f"param {index}")
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_close_relative(ours.state[param][key], theirs.state[expected][key], f"{key} {index}")
        assert float(ours.state[param]["step"]) == float(theirs.state[expected]["step"])


@pytest.mark.parametrize("backend", backend_params())
def test_capturable_keeps_steps_on_the_device_and_matches_torch(backend):
    generator = seeded_generator("capturable", backend)
    params = [p.requires_grad_() for p in small_params(generator)]
    expected = [p.detach().clone().requires_grad_() for p in params]
    ours = FusedAdamW(params, capturable=True, backend=backend, lr=torch.tensor(1e-2), **_no_lr())
    theirs = torch.optim.AdamW(expected, foreach=False, **OPTIONS)
    for grads in _grads(generator, params, STEPS):
        for p, q, g in zip(params, expected, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    _assert_same(ours, params, theirs, expected)
    step = ours.state[params[0]]["step"]
    assert step.dtype == torch.float32 and step.device == params[0].device
    assert ours._step_supports_amp_scaling


def _no_lr() -> dict:
    return {key: value for key, value in OPTIONS.items() if key != "lr"}


@pytest.mark.parametrize("backend", backend_params())
def test_lr_tensor_changed_in_place_takes_effect(backend):
    """A scheduler changes a capturable lr tensor in place (as a graph replay would see it)."""
    generator = seeded_generator("lr tensor", backend)
    params = [p.requires_grad_() for p in small_params(generator)]
    expected = [p.detach().clone().requires_grad_() for p in params]
    lr = torch.tensor(1e-2, device=DEVICE)
    ours = FusedAdamW(params, capturable=True, backend=backend, lr=lr, **_no_lr())
    theirs = torch.optim.AdamW(expected, foreach=False, **OPTIONS)
    for index, grads in enumerate(_grads(generator, params, STEPS)):
        new_lr = 1e-2 * 0.5**index
        ours.param_groups[0]["lr"].fill_(new_lr)
        theirs.param_groups[0]["lr"] = new_lr
        for p, q, g in zip(params, expected, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    _assert_same(ours, params, theirs, expected)


@pytest.mark.parametrize("backend", backend_params())
def test_fused_clipping_matches_clip_grad_norm_and_leaves_grads_alone(backend):
    generator = seeded_generator("clipping", backend)
    params = [p.requires_grad_() for p in small_params(generator)]
    expected = [p.detach().clone().requires_grad_() for p in params]
    ours = FusedAdamW(params, backend=backend, max_grad_norm=0.5, **OPTIONS)
    theirs = torch.optim.AdamW(expected, foreach=False, **OPTIONS)
    for grads in _grads(generator, params, STEPS, scale=3.0):  # norms well above 0.5: every step clips
        for p, q, g in zip(params, expected, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        torch.nn.utils.clip_grad_norm_(expected, 0.5)
        theirs.step()
        for p, g in zip(params, grads, strict=True):
            assert torch.equal(p.grad, g), "fused clipping must not rewrite the grads"
    _assert_same(ours, params, theirs, expected)


def _scaled_training(optimizer, params, grads_per_step, scaler, clip: float | None = None) -> None:
    """Each step: grads as a scaled backward would leave them, then GradScaler's step and update."""
    scaler.scale(torch.ones((), device=DEVICE))  # the scaler creates its scale on first use
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone() * scaler.get_scale()
        if clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("clip", [None, 0.5], ids=["", "clipped"])
def test_grad_scaler_hands_scale_and_found_inf_to_the_kernel(backend, clip):
    generator = seeded_generator("amp", backend, clip)
    params = [p.requires_grad_() for p in small_params(generator)]
    expected = [p.detach().clone().requires_grad_() for p in params]
    grads_per_step = _grads(generator, params, STEPS, scale=3.0)
    grads_per_step[2][1][0] = float("inf")  # one overflow: that step must change nothing
    grads_per_step[4][0].view(-1)[3] = float("nan")

    ours = FusedAdamW(params, capturable=True, backend=backend, max_grad_norm=clip, **OPTIONS)
    theirs = torch.optim.AdamW(expected, foreach=False, **OPTIONS)
    our_scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10, growth_interval=2)
    their_scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10, growth_interval=2)
    _scaled_training(ours, params, grads_per_step, our_scaler)
    _scaled_training(theirs, expected, grads_per_step, their_scaler, clip)

    assert our_scaler.get_scale() == their_scaler.get_scale()
    _assert_same(ours, params, theirs, expected)
    assert float(ours.state[params[0]]["step"]) == STEPS - 2, "skipped steps do not count"


@pytest.mark.parametrize("backend", backend_params())
def test_grad_scaler_without_capturable_takes_torchs_host_path(backend):
    """Host step counts: GradScaler unscales and checks found_inf itself, as for torch.optim's optimizers."""
    generator = seeded_generator("amp host", backend)
    params = [p.requires_grad_() for p in small_params(generator)]
    expected = [p.detach().clone().requires_grad_() for p in params]
    grads_per_step = _grads(generator, params, STEPS)
    grads_per_step[1][0].view(-1)[0] = float("inf")
    ours = FusedAdamW(params, backend=backend, **OPTIONS)
    theirs = torch.optim.AdamW(expected, foreach=False, **OPTIONS)
    assert not ours._step_supports_amp_scaling
    _scaled_training(ours, params, grads_per_step, torch.amp.GradScaler(DEVICE.type, init_scale=256.0))
    _scaled_training(theirs, expected, grads_per_step, torch.amp.GradScaler(DEVICE.type, init_scale=256.0))
    _assert_same(ours, params, theirs, expected)
