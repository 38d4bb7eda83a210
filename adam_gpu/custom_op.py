"""adam-gpu's step as torch custom ops, so that torch.compile puts it in its graph (adam_gpu.compiled_step).

``adam_gpu::adam_step_`` runs one param group's fused step: the real implementation checks and launches as the
functional step does (one launch), the fake one has nothing to compute (it only writes its inputs, all of which
``mutates_args`` names: the compiler then orders and, where it must, copies them). ``adam_gpu::clip_coefficient``
is the global-norm clip coefficient of all groups' grads, computed once as the eager step computes it.
Registering the ops imports no kernel and touches no GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from adam_gpu import dispatch, sharded, step_signature
from adam_gpu import masters as master_weights
from adam_gpu.device_inputs import DeviceInputs, device_values
from adam_gpu.functional import apply_step, check_state_steps
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.step_signature import grad_spans
from adam_gpu.step_tensors import LaunchMemo, StepTensors, WrittenSpans

# Every tensor list adam_step_ writes: grads alone are only read.
MUTATED = (
    "params",
    "exp_avgs",
    "exp_avg_sqs",
    "max_exp_avg_sqs",
    "state_steps",
    "masters",
    "exp_avg_absmaxes",
    "exp_avg_sq_absmaxes",
)


@torch.library.custom_op("adam_gpu::adam_step_", mutates_args=MUTATED)
def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    masters: list[Tensor],
    exp_avg_absmaxes: list[Tensor],
    exp_avg_sq_absmaxes: list[Tensor],
    master_indices: list[int],
    quantized_indices: list[int],
    lr: float,
    lr_tensor: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    capturable: bool,
    backend: str,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    clip_coefficient: Tensor | None,
) -> None:
    """One step of a param group, in place, as ``FusedAdam.step`` takes it: lists as its state holds them, but
    masters and absmaxes only of the params that have them, at ``master_indices`` and ``quantized_indices``
    (functionalization cannot take None in a list it writes); lr a float or ``lr_tensor`` (read on the device
    when ``capturable``, as the step counts); ``backend`` the name the optimizer's dispatch resolved."""
    count = len(params)
    tensors = StepTensors(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        scatter(masters, master_indices, count),
        scatter(exp_avg_absmaxes, quantized_indices, count),
        scatter(exp_avg_sq_absmaxes, quantized_indices, count),
    )
    checked = _still_checked(tensors, state_steps, capturable)
    if checked is None:
        written = tensors.check(amsgrad)
        check_state_steps(state_steps, len(tensors))
        aliased = written.aliased_grads(tensors.grads)
        tensors.copy_grads(aliased)
        if not len(tensors):
            return
        checked = _remember(tensors, state_steps, written) if not aliased else None
    if checked is not None:
        tensors.memo = checked.memo
    _, module = dispatch.resolve(backend, tensors.device, tensors.dtypes, tensors.features, tensors.converted_state)
    learning_rate = lr if lr_tensor is None else lr_tensor
    on_device_lr = capturable and lr_tensor is not None  # (float() would wait for the device)
    hp = AdamHyperparameters(
        0.0 if on_device_lr else float(learning_rate), beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize
    )
    grad_scaling = grad_scale is not None or found_inf is not None or clip_coefficient is not None
    device_inputs = None
    if capturable or grad_scaling:
        values = device_values(learning_rate, tensors.device, grad_scale, found_inf, clip_coefficient)
        device_inputs = DeviceInputs(values, state_steps if capturable else None, grad_scaling)
    # No marks are kept across compiled steps (the compiled graph may write a param back after the op, which a
    # mark would take for the user's write): an fp32 master is checked against its param every step
    # (adam_gpu.masters, "where no mark is known").
    master_weights.reseed_stale(tensors.params, tensors.params, tensors.masters, WeakTensorKeyDictionary())
    apply_step(module, tensors, state_steps, hp, device_inputs)


@dataclass
class _Checked:
    """What a call's full check proved of its tensors (the eager step's step_signature.PreparedGroup, for the op):
    a later call whose tensors have its ``signature``, with grads outside ``written``, passes the same checks."""

    signature: step_signature.StepSignature
    written: WrittenSpans
    grad_bytes: Tensor  # (what step_signature._grads_apart reads, with grads_apart)
    grads_apart: OrderedDict = field(default_factory=OrderedDict)
    memo: LaunchMemo = field(default_factory=LaunchMemo)


# Records of recent calls, by the ids of their params (the record holds them weakly: one whose params are gone, or
# whose ids went to other tensors, fails step_signature.matches). Compiled training steps call the op with the
# optimizer's own tensors under inductor; a record a param group is enough for most models.
_records: OrderedDict[tuple[int, ...], _Checked] = OrderedDict()
_RECORDS_KEPT = 256


def _still_checked(tensors: StepTensors, state_steps: list[Tensor], capturable: bool) -> _Checked | None:
    """The record of an earlier call whose full check still holds for these tensors, or None. Step counts may be
    other tensors (alike) only where they are read on the host: a capturable launch's table holds their addresses."""
    key = tuple(map(id, tensors.params))
    record = _records.get(key)
    if record is None:
        return None
    try:
        holds = step_signature.matches(record.signature, tensors, state_steps, steps_alike=not capturable)
    except (AttributeError, RuntimeError, TypeError):
        holds = False
    if not holds or not step_signature._grads_apart(record, tensors):
        return None
    _records.move_to_end(key)
    return record


def _remember(tensors: StepTensors, state_steps: list[Tensor], written: WrittenSpans) -> _Checked | None:
    """A record of tensors that have just passed the full checks (None where torch cannot sign them)."""
    signature = step_signature.signature(tensors, state_steps)
    if signature is None:
        return None
    record = _records[tuple(map(id, tensors.params))] = _Checked(signature, written, grad_spans(tensors.grads))
    if len(_records) > _RECORDS_KEPT:
        _records.popitem(last=False)
    return record


def scatter(values: list[Tensor], indices: list[int], count: int) -> list[Tensor | None]:
    """``count`` entries, ``values`` at ``indices`` and None elsewhere."""
    spread: list[Tensor | None] = [None] * count
    for index, value in zip(indices, values, strict=True):
        spread[index] = value
    return spread


def present(values: list[Tensor | None]) -> tuple[list[Tensor], list[int]]:
    """The tensors of ``values`` that are not None, and where they are (``scatter`` undoes it)."""
    indices = [index for index, value in enumerate(values) if value is not None]
    return [values[index] for index in indices], indices


@adam_step_.register_fake
def _adam_step_fake(*args: object, **kwargs: object) -> None:
    """Nothing to compute: the op returns nothing and writes only the tensors it was given."""


@torch.library.custom_op("adam_gpu::clip_coefficient", mutates_args=())
def clip_coefficient(grads: list[Tensor], max_norm: float, grad_scale: Tensor | None) -> Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` of all ``grads`` (unscaled by ``grad_scale``), float32 on the first
    grad's device: FusedAdam's fused clipping."""
    return sharded.clip_coefficient(grads, max_norm, grad_scale, grads[0].device)


@clip_coefficient.register_fake
def _clip_coefficient_fake(grads: list[Tensor], max_norm: float, grad_scale: Tensor | None) -> Tensor:
    return grads[0].new_empty((), dtype=torch.float32)
