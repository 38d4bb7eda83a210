"""Pure PyTorch backend built on ``torch._foreach_*``: runs on any device, math in fp32 (or float64).

It is the CPU fallback and the backend for float64 params. Low-precision tensors are upcast to fp32
working copies and rounded back once at the end, so its numbers match the kernels' fp32 math.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adam_gpu.device_inputs import FOUND_INF, GRAD_MULTIPLIER, LR, DeviceInputs
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


def adam_step(
    tensors: StepTensors, steps: list[float] | None, hp: AdamHyperparameters, device_inputs: DeviceInputs | None = None
) -> None:
    if device_inputs is not None:
        _adam_step_device_inputs(tensors, steps, hp, device_inputs)
        return
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


def _adam_step_device_inputs(
    tensors: StepTensors, steps: list[float] | None, hp: AdamHyperparameters, inputs: DeviceInputs
) -> None:
    """The same step with lr, grad multiplier and found_inf read from the device (and, in capturable
    mode, the step counts): tensor arithmetic only, so nothing waits for the device. Results are formed
    in copies and written back through ``where(found_inf, old, new)``, so a skipped step writes nothing."""
    storage = [tensors.params, tensors.exp_avgs, tensors.exp_avg_sqs, tensors.max_exp_avg_sqs]
    params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = ([t.to(torch.promote_types(t.dtype, torch.float32), copy=True)
                                                       for t in group] for group in storage)  # fmt: skip
    lr, multiplier, found_inf = inputs.values[LR], inputs.values[GRAD_MULTIPLIER], inputs.values[FOUND_INF]
    grads = torch._foreach_mul(_working_copies(tensors.grads), multiplier)
    first = hp.step_scalars(1.0)
    if hp.maximize:
        grads = torch._foreach_neg(grads)
    if hp.weight_decay != 0:
        if hp.decoupled:
            torch._foreach_mul_(params, 1.0 - lr * hp.weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=first.l2_weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, first.one_minus_beta1)
    torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), first.one_minus_beta2)
    if hp.amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
    if inputs.steps is not None:
        counts = [step.to(torch.float64) for step in inputs.steps]
        step_sizes = [lr / (1 - power) for power in torch._foreach_pow(hp.beta1, counts)]
        bias_corrections2_sqrt = torch._foreach_sqrt([1 - power for power in torch._foreach_pow(hp.beta2, counts)])
    else:
        scalars = [hp.step_scalars(step) for step in steps]
        step_sizes = [torch.full((), s.step_size, dtype=torch.float64, device=lr.device) for s in scalars]
        bias_corrections2_sqrt = [s.bias_correction2_sqrt for s in scalars]
    denominators = torch._foreach_sqrt(max_exp_avg_sqs if hp.amsgrad else exp_avg_sqs)
    torch._foreach_div_(denominators, bias_corrections2_sqrt)
    torch._foreach_add_(denominators, hp.eps)
    updates = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_mul_(updates, step_sizes)
    torch._foreach_sub_(params, updates)

    keep = found_inf != 0
    for stored_list, new_list in zip(storage, (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), strict=True):
        for stored, new in zip(stored_list, new_list, strict=True):
            stored.copy_(torch.where(keep, stored, new.to(stored.dtype)))
