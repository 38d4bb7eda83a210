"""A launch configuration that replaces a backend's defaults inside a ``with`` block.

Each kernel backend describes how it launches with a frozen ``LaunchConfig`` dataclass (its defaults are the
backend's named constants) and reads ``current_launch_config(device)`` at every launch: the override when one is
active, else the defaults. ``adam-gpu tune`` steps the launchers over a grid of configurations this way, without
editing source or patching module constants. The override lives in a ``ContextVar``, so it holds for the
thread (or task) that set it and ends with its block, error or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Generic, TypeVar

ConfigT = TypeVar("ConfigT")


class Override(Generic[ConfigT]):
    """``with override(config):`` launches with ``config``; ``override.get()`` is it, or None outside a block."""

    def __init__(self, name: str) -> None:
        self._current: ContextVar[ConfigT | None] = ContextVar(name, default=None)

    def get(self) -> ConfigT | None:
        return self._current.get()

    @contextlib.contextmanager
    def __call__(self, config: ConfigT) -> Iterator[ConfigT]:
        token = self._current.set(config)
        try:
            yield config
        finally:
            self._current.reset(token)


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0
