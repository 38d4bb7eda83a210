"""The table of backends: which exist, which can run for given tensors, and which ``auto`` picks.

A backend is a module in ``adam_gpu.backends`` (see its docstring); it is imported only when asked
about, so importing adam_gpu imports no Triton, touches no GPU and compiles nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import torch

AUTO = "auto"
# Replaces backend="auto" everywhere when set, e.g. ADAM_GPU_BACKEND=torch to rule out the kernels.
BACKEND_ENV_VAR = "ADAM_GPU_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run for these tensors; the message says why."""


@dataclass(frozen=True)
class Backend:
    name: str
    module: str
    requires: str | None  # the package it imports, if any
    install_hint: str = ""

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("triton", "adam_gpu.backends.triton", requires="triton", install_hint="pip install 'adam-gpu[triton]'"),
        Backend("cupy", "adam_gpu.backends.cupy", requires="cupy", install_hint="pip install 'adam-gpu[cupy]'"),
        Backend("torch", "adam_gpu.backends.torch", requires=None),
    )
}

# Tried in this order by backend="auto"; a device type not listed gets the default order.
# CUDA: triton before cupy until the benchmark has measured them side by side (issue 5).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cupy", "torch")}
DEFAULT_AUTO_ORDER: tuple[str, ...] = ("torch",)


def check_backend_name(name: str) -> None:
    """Raise ValueError unless ``name`` is ``"auto"`` or a registered backend."""
    if name != AUTO and name not in BACKENDS:
        known = ", ".join([AUTO, *BACKENDS])
        raise ValueError(f"unknown backend {name!r}; choose one of: {known}")


# Optional capabilities a step may need (step_tensors.EIGHT_BIT, ...); a backend module lists the ones
# it has in FEATURES.


def unavailable_reason(
    name: str, device: torch.device, dtypes: Iterable[torch.dtype], features: Iterable[str] = ()
) -> str | None:
    """None when backend ``name`` can update tensors of these dtypes on ``device`` with these features,
    else the reason."""
    backend = BACKENDS[name]
    if backend.requires and importlib.util.find_spec(backend.requires) is None:
        return f"{backend.requires} is not installed ({backend.install_hint})"
    try:
        module = backend.load()
    except ImportError as error:  # installed but broken, e.g. a mismatched build
        return f"importing {backend.requires or backend.module} failed: {error}"
    missing = sorted(set(features) - getattr(module, "FEATURES", frozenset()))
    if missing:
        return f"the {name} backend does not support {', '.join(missing)} yet"
    for dtype in sorted(set(dtypes), key=str):
        reason = module.unavailable_reason(torch.device(device), dtype)
        if reason is not None:
            return reason
    return None


def resolve(
    requested: str, device: torch.device, dtypes: Iterable[torch.dtype], features: Iterable[str] = ()
) -> tuple[str, ModuleType]:
    """The backend that will run: ``requested`` itself, or for ``"auto"`` the first available one.

    Raises ValueError for an unknown name and BackendUnavailableError, with the reason, for a backend
    that cannot run these tensors.
    """
    check_backend_name(requested)
    dtypes, features = set(dtypes), set(features)
    if requested == AUTO:
        requested = os.environ.get(BACKEND_ENV_VAR, AUTO)
        check_backend_name(requested)
    if requested != AUTO:
        reason = unavailable_reason(requested, device, dtypes, features)
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested} unavailable: {reason}")
        return requested, BACKENDS[requested].load()
    order = AUTO_ORDER.get(torch.device(device).type, DEFAULT_AUTO_ORDER)
    for name in order:
        if unavailable_reason(name, device, dtypes, features) is None:
            return name, BACKENDS[name].load()
    raise BackendUnavailableError(f"no backend can update {sorted(map(str, dtypes))} tensors on {device}")
