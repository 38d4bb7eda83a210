"""Pure PyTorch backend built on ``torch._foreach_*``: runs on any device, math in fp32 (or float64).

It is the CPU fallback and the backend for float64 params. Low-precision tensors are upcast to fp32
working copies and rounded back once at the end, so its numbers match the kernels' fp32 math. Master
weights are the working values where a param has them (an fp32 copy, or the lean bf16 + remainder).
On CPU tensors the step goes through torch's fused CPU kernel: directly where the tensors are as it takes them,
else on fp32 working chunks (torch_chunks.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from adam_gpu.backends import torch_chunks
from adam_gpu.backends.layout import contiguous_stand_ins
from adam_gpu.backends.lean_master import joined, lean_master, split
from adam_gpu.backends.torch_codes import dequantize_into, quantize_into
from adam_gpu.device_inputs import FOUND_INF, GRAD_MULTIPLIER, LR, DeviceInputs
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.step_tensors import GRAD, LaunchMemo, StepTensors
from adam_gpu.storage_formats import MOMENT_FEATURES, master_of, scaled_format

FEATURES = MOMENT_FEATURES
__all__ = ["FEATURES", "adam_step", "lean_master", "unavailable_reason"]


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _working_copies(tensors: Sequence[torch.Tensor], copy: bool = False) -> list[torch.Tensor]:
    """The tensors in at least fp32: the tensor itself where it already is (so updates land in place),
    unless ``copy``."""
    return [t.to(torch.promote_types(t.dtype, torch.float32), copy=copy) for t in tensors]


def _moment_values(
    moments: Sequence[torch.Tensor], absmaxes: Sequence[torch.Tensor | None], signed: bool, copy: bool
) -> list[torch.Tensor]:
    """Moments in at least fp32: 8-bit ones (an absmax given) dequantized, the others as _working_copies."""
    values = []
    for moment, absmax in zip(moments, absmaxes or [None] * len(moments), strict=True):
        if absmax is None:
            values += _working_copies([moment], copy)
            continue
        flat = torch.empty(moment.numel(), device=moment.device)
        values.append(dequantize_into(moment.reshape(-1), absmax, signed, out=flat).view(moment.shape))
    return values


def _quantize(value: torch.Tensor, signed: bool, codes_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale per block) of ``value`` in the scaled format of ``codes_dtype``, in fp32 as the kernels do
    (torch_codes)."""
    scale = scaled_format(codes_dtype).scale
    flat = value.to(torch.float32, copy=True).flatten()
    codes = torch.empty(flat.shape, dtype=codes_dtype, device=value.device)
    absmax = torch.empty(scale.blocks(flat.numel()), dtype=scale.dtype, device=value.device)
    quantize_into(flat, signed, codes, absmax)
    return codes.view(value.shape), absmax


def _store_moments(
    moments: Sequence[torch.Tensor],
    absmaxes: Sequence[torch.Tensor | None],
    values: Sequence[torch.Tensor],
    signed: bool,
    keep: torch.Tensor | None = None,
) -> None:
    """Write new moment values back (quantized where an absmax is given); where ``keep``, leave them."""
    for moment, absmax, value in zip(moments, absmaxes or [None] * len(moments), values, strict=True):
        if absmax is None:
            pairs = [(moment, value)]
        else:
            pairs = list(zip((moment, absmax), _quantize(value, signed, moment.dtype), strict=True))
        for target, new in pairs:
            if new is not target:
                target.copy_(new if keep is None else torch.where(keep, target, new.to(target.dtype)))


def _param_values(tensors: StepTensors, copy: bool) -> list[torch.Tensor]:
    """Each param's value in at least fp32: its master copy (itself, unless ``copy``), its lean master,
    or the param."""
    masters = tensors.masters or [None] * len(tensors)
    values = []
    for param, master in zip(tensors.params, masters, strict=True):
        if master is None:
            values += _working_copies([param], copy)
        elif not master_of(master.dtype).splits_param:  # (a copy: the value itself)
            values.append(master.clone() if copy else master)
        else:
            values.append(joined(param, master))
    return values


def _store_params(tensors: StepTensors, values: Sequence[torch.Tensor], keep: torch.Tensor | None = None) -> None:
    """Write new param values (and masters) back; where ``keep`` is true, leave everything as it was."""

    def store(target: torch.Tensor, new: torch.Tensor) -> None:
        if new is target:
            return
        target.copy_(new if keep is None else torch.where(keep, target, new.to(target.dtype)))

    masters = tensors.masters or [None] * len(tensors)
    for param, master, value in zip(tensors.params, masters, values, strict=True):
        if master is not None and master_of(master.dtype).splits_param:
            new_param, new_remainder = split(value, master.dtype)
            store(master, new_remainder)
            store(param.view(torch.int16), new_param.view(torch.int16))
            continue
        if master is not None:
            store(master, value)
        store(param, value)


# torch's fused CPU kernel: what it steps as adam-gpu does (fp32 math, moments in the param dtype). Its amsgrad max
# drops a NaN second moment in its scalar tail, which the for-loop keeps: a second pass restores it. It pairs the
# elements of non-contiguous tensors in memory order, not by index (torch 2.13): they get contiguous stand-ins.
_FUSED_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# That tail is the last numel % Vectorized::size() elements of a tensor (its threads' tasks are whole 64-byte lines):
# under 64 bytes where torch's vectors are at most 512 bits, so the second pass reads only each tensor's last
# 64 bytes there (docs/cpu-torch-backend.md, "amsgrad"); on other CPUs it reads the whole of both.
_TAIL_BYTES = 64
_VECTORS_OF_AT_MOST_512_BITS = frozenset({"DEFAULT", "NO AVX", "AVX2", "AVX512", "SVE256", "VSX", "ZVECTOR"})


def _fused_cpu_applies(tensors: StepTensors, hp: AdamHyperparameters, device_inputs: DeviceInputs | None) -> bool:
    """Whether torch's fused CPU kernel steps these tensors as adam-gpu does; what depends on the tensors alone is
    kept in ``tensors.memo`` (a reused step's tensors are alike, grads' strides included: 1000 tensors, 1 ms)."""
    if device_inputs is not None or torch_chunks.FUSED_CPU[hp.decoupled] is None or tensors.device.type != "cpu":
        return False
    memo = tensors.memo if tensors.memo is not None else LaunchMemo()
    if memo.fused_cpu is None:
        memo.fused_cpu = _fused_cpu_layout(tensors)
    return memo.fused_cpu


def _all_contiguous(tensors: StepTensors) -> bool:
    memo = tensors.memo if tensors.memo is not None else LaunchMemo()
    if memo.contiguous is None:
        lists = (tensors.params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs, tensors.max_exp_avg_sqs)
        memo.contiguous = all(t.is_contiguous() for tensors_of in lists for t in tensors_of)
    return memo.contiguous


def _fused_cpu_layout(tensors: StepTensors) -> bool:
    if any(m is not None for m in tensors.masters) or any(a is not None for a in tensors.exp_avg_absmaxes):
        return False
    maxima = tensors.max_exp_avg_sqs or [None] * len(tensors)
    for param, *others in zip(
        tensors.params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs, maxima, strict=True
    ):
        others = [t for t in others if t is not None]
        if param.dtype not in _FUSED_CPU_DTYPES or any(t.dtype != param.dtype for t in others):
            return False
        if others[0].is_neg():
            return False  # (the kernel refuses a grad with the negative bit: the foreach path reads it)
    return True


def _fused_cpu_step(tensors: StepTensors, steps: list[float], hp: AdamHyperparameters) -> None:
    """The step through torch's fused CPU kernel (one call for the group; it rounds once per element, and its
    vector loop and its tail are rounded differently: an element's last bit can depend on its position)."""
    if not _all_contiguous(tensors):
        with contextlib.ExitStack() as stack:
            rows = [stack.enter_context(contiguous_stand_ins(row, read_only=(GRAD,))) for row in tensors.per_tensor()]
            _fused_cpu_step(
                StepTensors(*map(list, zip(*rows, strict=True)), memo=LaunchMemo(contiguous=True)), steps, hp
            )
        return
    counts = {step: torch.tensor(float(step)) for step in set(steps)}  # (the kernel reads each count's value)
    state_steps = list(map(counts.__getitem__, steps))
    maxima = list(tensors.max_exp_avg_sqs) if hp.amsgrad else []
    moments = list(tensors.exp_avgs), list(tensors.exp_avg_sqs)
    torch_chunks.FUSED_CPU[hp.decoupled](
        list(tensors.params), list(tensors.grads), *moments, maxima, state_steps,
        amsgrad=hp.amsgrad, lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay, eps=hp.eps,
        maximize=hp.maximize,
    )  # fmt: skip
    if hp.amsgrad:
        torch._foreach_maximum_(*_amsgrad_tails(tensors))  # (NaN where the second moment is NaN)


def _amsgrad_tails(tensors: StepTensors) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(max_exp_avg_sqs, exp_avg_sqs), or where the fused kernel's scalar tail is within each tensor's last
    _TAIL_BYTES, views of those last bytes (kept in ``tensors.memo``: the same tensors at a reused step)."""
    memo = tensors.memo if tensors.memo is not None else LaunchMemo()
    if memo.amsgrad_tails is None:
        pairs = (list(tensors.max_exp_avg_sqs), list(tensors.exp_avg_sqs))
        if torch.backends.cpu.get_cpu_capability() in _VECTORS_OF_AT_MOST_512_BITS:
            pairs = tuple([t.view(-1)[-(_TAIL_BYTES // t.element_size()) :] for t in ts] for ts in pairs)
        memo.amsgrad_tails = pairs
    return memo.amsgrad_tails


def adam_step(
    tensors: StepTensors, steps: list[float] | None, hp: AdamHyperparameters, device_inputs: DeviceInputs | None = None
) -> None:
    if _fused_cpu_applies(tensors, hp, device_inputs):
        _fused_cpu_step(tensors, steps, hp)
        return
    if device_inputs is not None:
        _adam_step_device_inputs(tensors, steps, hp, device_inputs)
        return
    if torch_chunks.applies(tensors, hp):
        torch_chunks.chunked_step(tensors, steps, hp)
        return
    params = _param_values(tensors, copy=False)
    grads, max_exp_avg_sqs = _working_copies(tensors.grads), _working_copies(tensors.max_exp_avg_sqs)
    exp_avgs = _moment_values(tensors.exp_avgs, tensors.exp_avg_absmaxes, signed=True, copy=False)
    exp_avg_sqs = _moment_values(tensors.exp_avg_sqs, tensors.exp_avg_sq_absmaxes, signed=False, copy=False)
    scalars = [hp.step_scalars(step) for step in steps]
    first = scalars[0]  # everything but the bias corrections is the same for every tensor

    _update_moments(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hp, first.param_decay)
    denominators = torch._foreach_sqrt(max_exp_avg_sqs if hp.amsgrad else exp_avg_sqs)
    torch._foreach_div_(denominators, [s.bias_correction2_sqrt for s in scalars])
    torch._foreach_add_(denominators, first.eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, [-s.step_size for s in scalars])

    _store_params(tensors, params)
    _store_moments(tensors.exp_avgs, tensors.exp_avg_absmaxes, exp_avgs, signed=True)
    _store_moments(tensors.exp_avg_sqs, tensors.exp_avg_sq_absmaxes, exp_avg_sqs, signed=False)
    _store_moments(tensors.max_exp_avg_sqs, [], max_exp_avg_sqs, signed=False)


def _adam_step_device_inputs(
    tensors: StepTensors, steps: list[float] | None, hp: AdamHyperparameters, inputs: DeviceInputs
) -> None:
    """The same step with lr, grad multiplier and found_inf read from the device (and, in capturable
    mode, the step counts): tensor arithmetic only, so nothing waits for the device. Results are formed
    in copies and written back through ``where(found_inf, old, new)``, so a skipped step writes nothing."""
    params = _param_values(tensors, copy=True)
    exp_avgs = _moment_values(tensors.exp_avgs, tensors.exp_avg_absmaxes, signed=True, copy=True)
    exp_avg_sqs = _moment_values(tensors.exp_avg_sqs, tensors.exp_avg_sq_absmaxes, signed=False, copy=True)
    max_exp_avg_sqs = _working_copies(tensors.max_exp_avg_sqs, copy=True)
    lr, multiplier, found_inf = inputs.values[LR], inputs.values[GRAD_MULTIPLIER], inputs.values[FOUND_INF]
    grads = torch._foreach_mul(_working_copies(tensors.grads), multiplier)
    _update_moments(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hp, 1.0 - lr * hp.weight_decay)
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
    _store_params(tensors, params, keep)
    _store_moments(tensors.exp_avgs, tensors.exp_avg_absmaxes, exp_avgs, True, keep)
    _store_moments(tensors.exp_avg_sqs, tensors.exp_avg_sq_absmaxes, exp_avg_sqs, False, keep)
    _store_moments(tensors.max_exp_avg_sqs, [], max_exp_avg_sqs, False, keep)


def _update_moments(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    hp: AdamHyperparameters,
    param_decay: float | torch.Tensor,
) -> None:
    """Maximize, weight decay (L2 into the grads, or decoupled: params times ``param_decay``, a number or
    a device tensor) and the moment updates, in place on fp32 working values; the grads are not written."""
    scalars = hp.step_scalars(1.0)  # (the step count only changes the bias corrections, not used here)
    if hp.maximize:
        grads = torch._foreach_neg(grads)
    if hp.weight_decay != 0:
        if hp.decoupled:
            torch._foreach_mul_(params, param_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=scalars.l2_weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, scalars.one_minus_beta1)
    # v = beta2 * v + (1 - beta2) * g² in torch.optim's own form, so that an infinite v stays infinite as in
    # torch (the kernels' more accurate lerp form needs a select for that, which costs two more passes here).
    torch._foreach_mul_(exp_avg_sqs, hp.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, scalars.one_minus_beta2)
    if hp.amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
