"""Whether a step's tensors are alike to those of its group's last full check (FusedAdam's reused step), and the
record of that check (``PreparedGroup``): the one place that decides what a step may skip. ``reused`` is the
decision; torch's private APIs it relies on (TensorGuards, dict versions) are read here only, each with a fallback
(every step takes the full checks, or gathers and compares) that the tests run.

A step that hands the kernels the same param and state tensors as the last step whose every tensor was checked,
alike in address, dtype, device, layout, shape and strides, and grads alike in all but their address
(``zero_grad()`` frees the grads and backward makes new ones), would pass the same checks: FusedAdam then skips
them and reuses its tensor tables. What a step reads to know it:

- which optional tensors are missing (each list's None mask, or its length where all or none are);
- that every tensor but the grads is the same object, held by a weak reference: a tensor the user drops (state
  cleared or moved to the CPU, a group frozen) is freed, and a dead reference never matches;
- their addresses and those of the step counts (``param.data = ...`` moves a tensor but keeps the object);
- that no grad lies in memory the step writes (a grad that is a view of a param): the spans of the full check,
  against each new set of grad addresses (``_grads_apart``);
- torch's ``TensorGuards`` over all of them, step counts and grads included: the C++ check torch.compile runs on
  a compiled graph's inputs (type, dtype, device, dispatch keys, which tell dense from sparse, requires_grad, sizes and
  strides), in one C call (docs/benchmarks.md, "Host time of a step", says what each part costs).

Where the state dicts are the very dicts of the last full check, unmodified since, the kept tensors are known to
be the same objects without reading them from the dicts: CPython tags every dict with a version from a global
counter at its creation and at every change (Python < 3.12: the dict's own tag; 3.12 on: a dict watcher torch
installs), which torch's guards read in C (``dict_version``). One read per param then replaces gathering its
tensors into lists, splitting them and comparing their identity.
Where that reader is missing or does not behave as relied on (checked once, ``_dict_version_reader``), every
step gathers (``matches``).

TensorGuards aborts the process on a tensor whose TensorImpl has no strides (a non-jagged nested tensor). It is
given the objects it was built from (none nested: ``signature`` refuses them) and grads, which torch keeps dense
or sparse (the grad setter refuses nested tensors; sparse ones fail the check cleanly). Where torch has no
TensorGuards (it is torch's own, not public API), ``signature`` is None: every step takes the full checks.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import is_, itemgetter
from types import ModuleType
from typing import Any

import torch

from adam_gpu import native_guards
from adam_gpu.sharded import dtensor_type
from adam_gpu.step_tensors import LaunchMemo, StepTensors, WrittenSpans, int64_tensor, memory_span, overlapping

_data_ptr = torch.Tensor.data_ptr
_alive = weakref.ref.__call__  # (operator.call from Python 3.11)
_step_of = itemgetter("step")


def _tensor_guards_type() -> type | None:
    dynamo = getattr(torch._C, "_dynamo", None)
    return getattr(getattr(dynamo, "guards", None), "TensorGuards", None)


def _dict_version_reader() -> Callable[[dict], int] | None:
    """torch's reader of a dict's version tag, where it behaves as ``unchanged`` relies on: every change of a
    non-empty dict gives it a new version (a key set to the value it holds is no change: CPython keeps the tag),
    distinct dicts have distinct versions, and reading changes nothing.
    None where torch has no reader or it fails that (a Python or torch that tags dicts otherwise). It must be
    given exact dicts only (below Python 3.12 it reads the tag without checking the type)."""
    reader = getattr(getattr(getattr(torch._C, "_dynamo", None), "guards", None), "dict_version", None)
    if reader is None:
        return None
    changes = (
        lambda d: d.__setitem__("a", 2),  # an existing key
        lambda d: d.__setitem__("b", 3),  # a new key
        lambda d: d.__delitem__("b"),
        lambda d: d.update(c=4),
        lambda d: d.setdefault("e", 5),
        lambda d: d.pop("e"),
        lambda d: d.popitem(),
        lambda d: d.__ior__({"f": 6}),
        lambda d: d.clear(),
    )
    try:
        probe, other = {"a": 1, "z": 0}, {"a": 1, "z": 0}
        seen = [reader(probe)]
        for change in changes:
            change(probe)
            seen.append(reader(probe))
        stable = reader(probe) == seen[-1] and reader(other) == reader(other)
        distinct = len({*seen, reader(other)}) == len(seen) + 1
    except Exception:  # (a private reader: whatever it raises means it is not usable)
        return None
    return reader if stable and distinct else None


_dict_version = _dict_version_reader()


def _mapping_version_reader() -> Callable[[dict], int] | None:
    """``_dict_version`` where it also tells every change of a ``defaultdict`` (the optimizer's state mapping
    is one): a new key, a key set to another value, one popped."""
    if _dict_version is None:
        return None
    try:
        probe = collections.defaultdict(dict, a={})
        seen = [_dict_version(probe)]
        for change in (lambda d: d["b"], lambda d: d.__setitem__("a", {}), lambda d: d.pop("b"), lambda d: d.clear()):
            change(probe)
            seen.append(_dict_version(probe))
    except Exception:  # (a private reader: whatever it raises means it is not usable)
        return None
    return _dict_version if len(set(seen)) == len(seen) else None


_mapping_version = _mapping_version_reader()


def state_mapping_version(mapping: Mapping) -> int | None:
    """The version tag of the optimizer's state mapping (a defaultdict), or None where it cannot be read."""
    if _mapping_version is None or not isinstance(mapping, dict):
        return None
    try:
        return _mapping_version(mapping)
    except Exception:  # (see state_versions)
        return None


def state_versions(states: Sequence[Mapping[str, Any]], all_dicts: bool = False) -> list[int] | None:
    """The version tags of these state dicts, or None where they cannot be read (no usable reader, a state that
    is not exactly a dict: a missing one, a user's mapping; or the reader failing, as torch's does on Python 3.12
    where it cannot add its dict watcher). ``all_dicts``: the caller knows each is exactly a dict."""
    if _dict_version is None or not (all_dicts or set(map(type, states)) == {dict}):
        return None
    try:
        return list(map(_dict_version, states))
    except Exception:  # (a private reader: whatever it raises means no versions)
        return None


@dataclass(frozen=True)
class StepSignature:
    """What a full check passed (see the module docstring)."""

    # Per list of StepTensors.lists(): its length where every entry is a tensor, minus its length where every
    # entry is None (masters, absmaxes of a plain group), else its None mask.
    masks: list
    kept: list[weakref.ref]  # every tensor but the grads, in the lists' order (weakly: see the module docstring)
    steps: list[weakref.ref]  # the step counts (weakly), which ``matches`` finds in the state dicts anew
    addresses: list[int]  # the data_ptr of each of ``kept``, then of each step count
    guards: Any  # torch's TensorGuards over ``kept``, the step counts and the grads
    state_versions: list[int] | None = None  # of the state dicts ``kept`` was gathered from (state_versions)
    native: Any = None  # adam_gpu.native_guards.Snapshot of the same, where it is built: ``unchanged`` asks it


def _split(tensors: StepTensors) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
    """(masks, kept, grads) of these tensors (see StepSignature)."""
    masks: list = []
    kept: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for values in tensors.lists():
        present = [t for t in values if t is not None]
        if len(present) == len(values):
            masks.append(len(values))
        else:
            masks.append([t is None for t in values] if present else -len(values))
        (grads if values is tensors.grads else kept).extend(present)
    return masks, kept, grads


def signature(
    tensors: StepTensors, steps: Sequence[torch.Tensor], states: Sequence[Mapping[str, Any]] = ()
) -> StepSignature | None:
    """The signature of tensors that have just passed the full checks, with their step counts and, where given,
    the state dicts (of ``tensors.params``, in order) they were gathered from; None for DTensors (their sharding
    is checked every step), nested tensors, or where torch has no TensorGuards."""
    guards_type = _tensor_guards_type()
    if guards_type is None:
        return None
    masks, kept, grads = _split(tensors)
    dtensor = dtensor_type() or ()
    if any(not isinstance(t, torch.Tensor) or t.is_nested or isinstance(t, dtensor) for t in chain(kept, steps, grads)):
        return None  # (a nested tensor the checks let through, an 8-bit absmax say: TensorGuards would abort)
    try:
        guards = guards_type(*kept, *steps, *grads, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except (TypeError, RuntimeError):  # (another signature in another torch: no reuse)
        return None
    addresses = list(map(_data_ptr, chain(kept, steps)))
    versions = state_versions(states) if states else None
    snapshot = native_guards.snapshot_type()
    native = snapshot([*kept, *steps], grads) if snapshot is not None else None
    return StepSignature(
        masks, list(map(weakref.ref, kept)), list(map(weakref.ref, steps)), addresses, guards, versions, native
    )


def matches(
    expected: StepSignature, tensors: StepTensors, steps: Sequence[torch.Tensor], steps_alike: bool = False
) -> bool:
    """Whether ``tensors`` and ``steps`` have the signature ``expected``. Checked in this order: the masks
    (equal masks, equal counts of kept tensors and grads), then the identity of the kept tensors (so that
    TensorGuards sees only the TensorImpls it was built from, and grads), then the addresses, then TensorGuards.
    ``steps_alike``: the step counts may be other tensors, alike in all but their addresses (a compiled graph hands
    its op copies of them), as grads may. A step count that is not a dense tensor raises (a caller takes that as
    no match)."""
    masks, kept, grads = _split(tensors)
    if steps_alike:
        return (
            masks == expected.masks
            and len(steps) == len(expected.steps)
            and all(map(is_, kept, map(_alive, expected.kept)))
            and list(map(_data_ptr, kept)) == expected.addresses[: len(kept)]
            and expected.guards.check(*kept, *steps, *grads)
        )
    return (
        masks == expected.masks
        and all(map(is_, kept, map(_alive, expected.kept)))
        and all(map(is_, steps, map(_alive, expected.steps)))  # (so that TensorGuards sees no other object)
        and list(map(_data_ptr, chain(kept, steps))) == expected.addresses
        and expected.guards.check(*kept, *steps, *grads)
    )


def unchanged(
    expected: StepSignature,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Mapping[str, Any]],
) -> tuple[StepTensors, list[torch.Tensor]] | None:
    """The kernels' tensors and the step counts of ``params`` where their state dicts, of versions
    ``expected.state_versions`` (the caller compared them), hold what they held at the signature: the kept
    tensors are then those of ``expected`` (held weakly, alive while the dicts hold them), and this checks what
    a dict's version does not tell: that the params are the same, the addresses, and TensorGuards with the grads.
    None where they differ."""
    kept = list(map(_alive, expected.kept))
    count = len(params)
    steps = list(map(_step_of, states))
    grad_pointers = None
    if expected.native is not None:  # (the same proof in one C++ call: adam_gpu.native_guards)
        if expected.masks[0] == count:
            grad_pointers = expected.native.holds(_as_list(params), _as_list(grads))
        if grad_pointers is None:
            return None
    elif not (
        expected.masks[0] == count
        and all(map(is_, params, kept[:count]))
        and list(map(_data_ptr, chain(kept, steps))) == expected.addresses
        and expected.guards.check(*kept, *steps, *grads)
    ):
        return None
    lists: list[Sequence[torch.Tensor | None]] = [params, grads]
    at = count  # (the params come first in kept)
    for mask in expected.masks[2:]:
        if isinstance(mask, int) and mask >= 0:
            lists.append(kept[at : at + mask])
            at += mask
        elif isinstance(mask, int):
            lists.append([None] * -mask)
        else:
            present = iter(kept[at:])
            lists.append([None if absent else next(present) for absent in mask])
            at += mask.count(False)
    tensors = StepTensors(*lists)
    tensors.grad_pointers = grad_pointers
    return tensors, steps


def _as_list(values: Sequence) -> list:
    return values if type(values) is list else list(values)


# Grad address sets a group keeps as found apart from the memory its step writes (PreparedGroup.grads_apart).
_GRADS_APART_KEPT = 8
Gather = Callable[[dict, Sequence[torch.Tensor], Sequence[Mapping[str, Any]]], tuple[StepTensors, list[torch.Tensor]]]


@dataclass
class PreparedGroup:
    """What a param group's last full check proved, kept for its next steps (FusedAdam): a later step whose
    tensors have the same ``signature`` (grads may be new tensors, as after ``zero_grad()``, if they lie outside
    the memory the step writes) under the same ``options`` (the group options that decide its state layout)
    passes every check as they did and finds its state complete. It skips the per-tensor checks, and the
    backends reuse what they derived from its tensors (``memo``)."""

    group: dict[str, Any]
    options: tuple
    signature: StepSignature
    step_buffer: torch.Tensor | None  # functional.shared_step_buffer of the group's step counts
    dtypes: set[torch.dtype]  # of the params
    written: WrittenSpans  # the memory the step writes: a new grad must not lie in it
    grad_bytes: torch.Tensor  # int64: each grad's span at the full check (new grads are alike: TensorGuards)
    features: frozenset[str]  # what its moment format asks of a backend (8-bit moments: with a tensor large enough)
    memo: LaunchMemo = field(default_factory=LaunchMemo)
    # Grad addresses of reused steps found outside ``written`` (the last few: backward reuses freed memory).
    grads_apart: OrderedDict[tuple[int, ...], None] = field(default_factory=OrderedDict)
    # The backend dispatch.resolve gave a reused step, by what else it depends on (the optimizer's backend, the
    # environment's): the dtypes, features and device are those of the full check (TensorGuards saw them).
    resolved: tuple[tuple, tuple[str, ModuleType]] | None = None
    # The params' state dicts, found in the optimizer's state mapping of this version (state_mapping_version):
    # while it is unchanged, it maps each param to the same dict (a lookup a param is saved).
    states: list | None = None
    state_mapping: Mapping | None = None
    state_mapping_version: int | None = None
    # The group's hyperparameter values (optim._hyperparameters) at its last step, and what they made.
    hyperparameters: tuple[tuple, Any] | None = None

    def with_states(self, mapping: Mapping, states: list) -> PreparedGroup:
        """This record, keeping ``states`` (the params' dicts in ``mapping``, the optimizer's state) where each is
        exactly a dict."""
        exact = all(type(state) is dict for state in states)
        self.states, self.state_mapping = (states, mapping) if exact else (None, None)
        self.state_mapping_version = state_mapping_version(mapping) if exact else None
        return self

    def states_of(self, mapping: Mapping, params: Sequence[torch.Tensor]) -> tuple[list, bool]:
        """The state dicts of ``params`` in ``mapping``, and whether they are those kept, where the mapping is
        unchanged since (and ``params`` as many: ``unchanged`` then checks they are the same); else looked up."""
        version = self.state_mapping_version
        if version is not None and mapping is self.state_mapping and self.states and len(params) == len(self.states):
            if state_mapping_version(mapping) == version:
                return self.states, True
        return list(map(mapping.get, params)), False

    @classmethod
    def of(
        cls,
        group: dict[str, Any],
        options: tuple,
        signature: StepSignature,
        tensors: StepTensors,
        step_buffer: torch.Tensor | None,
        written: WrittenSpans,
        features: frozenset[str],
    ) -> PreparedGroup:
        """The record of a full check that passed ``tensors`` (the kernels' plain tensors, grads as given)."""
        grad_bytes = grad_spans(tensors.grads)
        return cls(group, options, signature, step_buffer, tensors.dtypes, written, grad_bytes, features)


def grad_spans(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each grad's memory span in bytes (int64, on the host): what ``_grads_apart`` checks new grads' addresses with
    (their spans are alike: TensorGuards)."""
    return int64_tensor([end - start for start, end in map(memory_span, grads)])


def reused(
    prepared: PreparedGroup,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    mapping: Mapping,
    gather: Gather,
) -> tuple[StepTensors, list[torch.Tensor]] | None:
    """The kernels' tensors and step counts of a step of ``prepared.group`` (``params`` with their ``grads``, and
    their states in ``mapping``, the optimizer's) whose last full check still holds for them; None where anything
    may have changed (or for anything unusual: a missing state, a non-tensor), so that the full checks run.
    ``gather`` reads the lists from the states."""
    states, kept = prepared.states_of(mapping, params)
    versions = state_versions(states, all_dicts=kept)  # (the kept ones were found exact dicts: with_states)
    signature = prepared.signature
    try:
        if versions is not None and versions == signature.state_versions:  # the same dicts, unchanged
            found = unchanged(signature, params, grads, states)
            return found if found is not None and _grads_apart(prepared, found[0]) else None
        tensors, steps = gather(prepared.group, params, states)
        if not matches(signature, tensors, steps):
            return None
    except (AttributeError, KeyError, RuntimeError, TypeError):
        return None
    if not _grads_apart(prepared, tensors):
        return None
    # A dict that changed but holds the tensors of the last full check (an entry the kernels do not read, say):
    # the next steps compare its new version.
    prepared.signature = dataclasses.replace(signature, state_versions=versions)
    return tensors, steps


def _grads_apart(prepared: PreparedGroup, tensors: StepTensors) -> bool:
    """Whether none of a reused step's grads lies in memory the step writes (a full check then reads it from a
    copy): known for the addresses of recent steps, else found from the spans of the full check. The addresses
    read are kept in ``tensors.grad_pointers`` (the launchers read them too)."""
    pointers = tensors.grad_pointers = tensors.grad_pointers or tuple(map(_data_ptr, tensors.grads))
    kept = prepared.grads_apart
    if pointers in kept:
        kept.move_to_end(pointers)
        return True
    starts = int64_tensor(pointers)
    if bool(overlapping(prepared.written, starts, prepared.grad_bytes).any()):
        return False
    kept[pointers] = None
    if len(kept) > _GRADS_APART_KEPT:
        kept.popitem(last=False)
    return True
