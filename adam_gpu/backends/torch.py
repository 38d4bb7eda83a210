"""Pure PyTorch backend built on ``torch._foreach_*``: runs on any device, math in fp32 (or float64).

It is the CPU fallback and the backend for float64 params. Low-precision tensors are upcast to fp32
working copies and rounded back once at the end, so its numbers match the kernels' fp32 math.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.step_tensors import StepTensors


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _working_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in at least fp32: the tensor itself where it already is (so updates land in place)."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def _write_back(storage: Sequence[torch.Tensor], working: Sequence[torch.Tensor]) -> None:
    for stored, work in zip(storage, working, strict=True):
        if work is not stored:
            stored.copy_(work)


def adam_step(tensors: StepTensors, steps: list[float], hp: AdamHyperparameters) -> None:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
        _working_copies(t)
        for t in (tensors.params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs, tensors.max_exp_avg_sqs)
    )
    scalars = [hp.step_scalars(step) for step in steps]
    first = scalars[0]  # everything but the bias corrections is the same for every tensor

    if hp.maximize:
        grads = torch._foreach_neg(grads)
    if hp.weight_decay != 0:
        if hp.decoupled:
            torch._foreach_mul_(params, first.param_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=first.l2_weight_decay)

    torch._foreach_lerp_(exp_avgs, grads, first.one_minus_beta1)
    torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), first.one_minus_beta2)
    if hp.amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
    denominators = torch._foreach_sqrt(max_exp_avg_sqs if hp.amsgrad else exp_avg_sqs)
    torch._foreach_div_(denominators, [s.bias_correction2_sqrt for s in scalars])
    torch._foreach_add_(denominators, first.eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, [-s.step_size for s in scalars])

    _write_back(tensors.params, params)
    _write_back(tensors.exp_avgs, exp_avgs)
    _write_back(tensors.exp_avg_sqs, exp_avg_sqs)
    _write_back(tensors.max_exp_avg_sqs, max_exp_avg_sqs)
