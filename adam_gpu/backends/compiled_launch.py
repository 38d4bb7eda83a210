"""Launches of a Triton kernel through its compiled launcher, below ``JITFunction.run``'s per-call work.

``kernel[grid](...)`` binds the arguments, computes their specialization and the cache key, looks the compiled
kernel up and then calls its launcher: most of a launch's host time (docs/benchmarks.md, "Host time of a step").
``CompiledLaunches`` makes the first launch of each kind
through ``kernel[grid]``, keeps the compiled kernel it returns, and makes the next launches of that kind with the
launcher call ``JITFunction.run`` ends in, the same arguments in the same order.

A kind is everything Triton's choice of a compiled kernel depends on for this kernel's arguments: the device, the
constexprs and options passed, and the specialization of the runtime arguments (a tensor's 16-byte alignment; an
integer being 1, divisible by 16, or beyond 32 bits; floats are not specialized). Launches take ``kernel[grid]``
whenever Triton is asked to watch them (launch hooks, pre-run hooks), and always where this Triton's
``JITFunction.run`` does not end in the call made here (``direct_calls_supported``: read from its source once).
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from triton import knobs
from triton.runtime.driver import driver

# The launch JITFunction.run makes once it has its compiled kernel (its last statement), as CompiledLaunches makes it.
_RUN_LAUNCH = (
    "launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())",
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,",
    "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())",
)


@functools.cache
def direct_calls_supported() -> bool:
    """Whether this Triton's ``JITFunction.run`` launches as ``CompiledLaunches`` does (read from its source)."""
    from triton.runtime.jit import JITFunction

    try:
        source = " ".join(inspect.getsource(JITFunction.run).split())
    except (OSError, TypeError):  # (no source shipped)
        return False
    return all(" ".join(line.split()) in source for line in _RUN_LAUNCH)


def _aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % 16 == 0


def _integer_class(value: int) -> tuple[bool, ...]:
    return value == 1, value % 16 == 0, -(2**31) <= value < 2**31, value < 2**63


def _of_other_type(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return _aligned(arg)
    if isinstance(arg, int):
        return type(arg), _integer_class(arg)
    if isinstance(arg, float) or arg is None:
        return type(arg)
    raise TypeError(f"CompiledLaunches takes tensors, integers, floats and None, not {type(arg).__name__}")


# Argument tuples whose specialization CompiledLaunches keeps (a few a param group: its tables for recent grads).
_SPECIALIZATIONS_KEPT = 64
# What Triton specializes an argument on, by its type (see the module docstring).
_SPECIALIZED = {torch.Tensor: _aligned, int: _integer_class, bool: bool}


def _specialization(args: Sequence[Any]) -> tuple:
    return tuple(_SPECIALIZED.get(type(arg), _of_other_type)(arg) for arg in args)


class CompiledLaunches:
    """Launches of ``kernel`` (a JITFunction whose constexpr parameters come after its runtime ones), each kind of
    launch compiled (and first launched) by ``kernel[grid]`` and then made by its compiled kernel's launcher."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        self._compiled: dict[tuple, Any] = {}
        # The specialization of recent argument tuples, by their objects' ids (the objects held with it, so that
        # the ids stay theirs): a step's table tensors are those of the last steps (a lookup).
        self._specializations: OrderedDict[tuple[int, ...], tuple[tuple, tuple]] = OrderedDict()

    def __call__(
        self, grid: int, device_index: int, args: tuple, scalars: tuple, constexprs: dict[str, Any], options: tuple
    ) -> None:
        """Launch ``kernel[(grid,)](*args, *scalars, **constexprs, **dict(options))`` on the current stream of
        device ``device_index`` (the current device: Triton launches there). ``scalars`` are floats, which Triton
        does not specialize on."""
        key = (device_index, tuple(constexprs.values()), options, self._specialization(args))
        compiled = self._compiled.get(key)
        if compiled is None or self._watched():
            compiled = self._kernel[(grid,)](*args, *scalars, **constexprs, **dict(options))
            runtime_count = len(args) + len(scalars)
            if direct_calls_supported() and self._kernel.arg_names[runtime_count:] == list(constexprs):
                self._compiled[key] = compiled
            return
        stream = driver.active.get_current_stream(device_index)
        run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
        run(grid, 1, 1, stream, function, metadata, None, None, None, *args, *scalars, *constexprs.values())

    def _specialization(self, args: tuple) -> tuple:
        ids = tuple(map(id, args))
        known = self._specializations.get(ids)
        if known is not None:
            self._specializations.move_to_end(ids)
            return known[1]
        specialization = _specialization(args)
        self._specializations[ids] = (args, specialization)
        if len(self._specializations) > _SPECIALIZATIONS_KEPT:
            self._specializations.popitem(last=False)
        return specialization

    def _watched(self) -> bool:
        """Whether Triton is asked to see each launch (then ``kernel[grid]`` makes it)."""
        runtime = knobs.runtime
        hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
        return any(map(_set, hooks)) or bool(getattr(self._kernel, "pre_run_hooks", None))


def _set(hook: Any) -> bool:
    """Whether a launch hook of Triton's is set: a function, or a HookChain (Triton >= 3.5) holding one."""
    return bool(getattr(hook, "calls", hook))
