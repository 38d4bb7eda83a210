"""Whether a step's tensors are alike to those of its group's last full check (FusedAdam's reused step).

A step that hands the kernels the same param and state tensors as the last step whose every tensor was checked,
alike in address, dtype, device, layout, shape and strides, and grads alike in all but their address
(``zero_grad()`` frees the grads and backward makes new ones), would pass the same checks: FusedAdam then skips
them and reuses its tensor tables. What a step reads to know it:

- which optional tensors are missing (each list's None mask);
- that every tensor but the grads is the same object, held by a weak reference: a tensor the user drops (state
  cleared or moved to the CPU, a group frozen) is freed, and a dead reference never matches;
- their addresses and those of the step counts (``param.data = ...`` moves a tensor but keeps the object);
- torch's ``TensorGuards`` over all of them, grads included: the C++ check torch.compile runs on a compiled
  graph's inputs (type, dtype, device, dispatch keys, which tell dense from sparse, requires_grad, sizes and
  strides). For 1000 params (4000 tensors) it takes 0.2 ms where reading the same in Python took 1.9 ms.

TensorGuards aborts the process on a tensor whose TensorImpl has no strides (a non-jagged nested tensor). It is
given the objects it was built from (none nested: ``signature`` refuses them) and grads, which torch keeps dense
or sparse (the grad setter refuses nested tensors; sparse ones fail the check cleanly). Where torch has no
TensorGuards (it is torch's own, not public API), ``signature`` is None: every step takes the full checks.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from operator import is_
from typing import Any

import torch

from adam_gpu.sharded import dtensor_type
from adam_gpu.step_tensors import StepTensors

_data_ptr = torch.Tensor.data_ptr


def _tensor_guards_type() -> type | None:
    dynamo = getattr(torch._C, "_dynamo", None)
    return getattr(getattr(dynamo, "guards", None), "TensorGuards", None)


@dataclass(frozen=True)
class StepSignature:
    """What a full check passed (see the module docstring)."""

    masks: list  # per list of StepTensors.lists(): its length, or its None mask where some are None
    kept: list[weakref.ref]  # every tensor but the grads, in the lists' order (weakly: see the module docstring)
    addresses: list[int]  # the data_ptr of each of ``kept``, then of each step count
    guards: Any  # torch's TensorGuards over ``kept`` and then the grads


def _split(tensors: StepTensors) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
    """(masks, kept, grads) of these tensors (see StepSignature)."""
    masks: list = []
    kept: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for values in tensors.lists():
        present = [t for t in values if t is not None]
        masks.append(len(values) if len(present) == len(values) else [t is None for t in values])
        (grads if values is tensors.grads else kept).extend(present)
    return masks, kept, grads


def signature(tensors: StepTensors, steps: Sequence[torch.Tensor]) -> StepSignature | None:
    """The signature of tensors that have just passed the full checks, with their step counts; None for
    DTensors (their sharding is checked every step), nested tensors, or where torch has no TensorGuards."""
    guards_type = _tensor_guards_type()
    if guards_type is None:
        return None
    masks, kept, grads = _split(tensors)
    dtensor = dtensor_type() or ()
    if any(t.is_nested or isinstance(t, dtensor) for t in chain(kept, grads)):
        return None  # (a nested tensor the checks let through, an 8-bit absmax say: TensorGuards would abort)
    try:
        guards = guards_type(*kept, *grads, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except (TypeError, RuntimeError):  # (another signature in another torch: no reuse)
        return None
    return StepSignature(masks, list(map(weakref.ref, kept)), list(map(_data_ptr, chain(kept, steps))), guards)


def matches(expected: StepSignature, tensors: StepTensors, steps: Sequence[torch.Tensor]) -> bool:
    """Whether ``tensors`` and ``steps`` have the signature ``expected``. Checked in this order: the masks
    (equal masks, equal counts of kept tensors and grads), then the identity of the kept tensors (so that
    TensorGuards sees only the TensorImpls it was built from, and grads), then the addresses, then TensorGuards.
    A step count that is not a dense tensor raises (a caller takes that as no match)."""
    masks, kept, grads = _split(tensors)
    return (
        masks == expected.masks
        and all(map(is_, kept, [alive() for alive in expected.kept]))  # (0.12 ms for 3000 tensors)
        and list(map(_data_ptr, chain(kept, steps))) == expected.addresses
        and expected.guards.check(*kept, *grads)
    )
