"""Real-training parity (examples/train_parity.py): an MLP trained on scikit-learn's digits with a OneCycleLR
schedule, gradient clipping and, in the AMP variants, fp16 autocast with GradScaler has the same per-step
loss curve under FusedAdamW (every backend) as under torch.optim.AdamW, GradScaler skips the same steps
(overflowing first steps and an injected inf), and the loss goes down."""

from __future__ import annotations

import functools

import pytest
import torch
from support import backend_params, import_script

pytest.importorskip("sklearn.datasets")
parity = import_script("examples/train_parity.py")

STEPS = 100
# Triton's CPU interpreter takes about 55 ms a step here: 30 steps (the inf is injected at step 20).
STEPS_BY_BACKEND = {"triton": 30}
# Tolerances on max over steps of |ours - torch| / torch, measured with seeds 0-2 (CPU, torch 2.13, one
# thread; 100 steps, Triton 30): in fp32 the backends differ from torch.optim.AdamW's for-loop by 1.1e-7 to
# 4.1e-7, as much as torch's own fused AdamW does (1.0e-7 to 2.7e-7): fp32 rounding of the update, carried.
FP32_RTOL = 2e-6
# With fp16 autocast a last-bit difference in a weight can change its fp16 rounding in the forward pass,
# a step of 2**-11 = 4.9e-4 relative: the backends differ by 2.4e-5 to 8.7e-4, and torch's own fused
# AdamW by 0 to 5.8e-4. 2e-3 is about 4 fp16 ulps; a missing clip (test below) or a wrongly skipped
# step moves the loss by percents, and the skipped steps and scales are compared exactly.
AMP_RTOL = 2e-3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """A 64-64-10 MLP gains nothing from intra-op threads, and on 2 cores shared with other jobs torch's
    second thread waits so often that this file took 74 s instead of 17 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _reference(variant: str, steps: int) -> parity.TrainingRun:
    """torch.optim.AdamW's run, shared by the backends."""
    return parity.train(parity.torch_adamw, parity.VARIANTS[variant], steps, seed=0, clip=True)


def _fused(variant: str, steps: int, backend: str, clip: bool | None = None) -> parity.TrainingRun:
    """FusedAdamW's run; ``clip``: clip_grad_norm_ before each step (default: unless it clips itself)."""
    options = parity.VARIANTS[variant]
    clip = not options.fused_clip if clip is None else clip
    return parity.train(parity.fused_adamw(backend, options), options, steps, seed=0, clip=clip)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", parity.VARIANTS)
def test_loss_curve_matches_torch_adamw(backend, variant):
    steps = STEPS_BY_BACKEND.get(backend, STEPS)
    reference = _reference(variant, steps)
    ours = _fused(variant, steps, backend)

    losses = reference.losses
    # Down from 2.31 to about 0.2 in 100 steps, to 1.2 in the 30 AMP steps (7 skipped) of the Triton run.
    assert sum(losses[-10:]) / 10 < 0.7 * losses[0], f"torch's run did not train: {losses[0]} -> {losses[-10:]}"
    assert len(reference.clipped_steps) >= steps // 5, "clip_grad_norm_ should clip a good part of the steps"
    rtol = AMP_RTOL if parity.VARIANTS[variant].amp else FP32_RTOL
    difference = parity.max_relative_difference(ours.losses, losses)
    assert difference <= rtol, f"loss curves differ by {difference:.2e} relative (tolerance {rtol:.0e})"
    assert ours.skipped_steps == reference.skipped_steps
    assert ours.scales == reference.scales
    if parity.VARIANTS[variant].amp:
        # The first steps overflow fp16 at the initial scale of 2**24, and the injected inf is skipped.
        assert reference.skipped_steps[0] == 0 and parity.INJECTED_INF_STEP in reference.skipped_steps


def test_the_tolerance_would_catch_a_missing_clip():
    """The fp32 tolerance is tight enough to fail: FusedAdamW left unclipped against torch.optim.AdamW with
    clip_grad_norm_ moves the curve far beyond it."""
    unclipped = _fused("fp32", STEPS, "torch", clip=False)
    difference = parity.max_relative_difference(unclipped.losses, _reference("fp32", STEPS).losses)
    assert difference > 100 * FP32_RTOL, f"a missing clip moved the loss curve by only {difference:.2e}"
