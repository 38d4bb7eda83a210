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

from adam_gpu import storage_formats

AUTO = "auto"
# Replaces backend="auto" everywhere when set (and not empty), e.g. ADAM_GPU_BACKEND=torch to rule out the kernels.
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
        Backend("cpu", "adam_gpu.backends.cpu", requires=None),
        Backend("torch", "adam_gpu.backends.torch", requires=None),
    )
}

# What backend="auto" tries, in order, by device type and kind of step (step_kinds: a step's kinds, most specific
# first: a moment format's feature, state in another dtype, the params' width; the first a device lists decides, else
# the default order). The CUDA order is the fastest per kind in the H200 benchmark (docs/benchmarks.md, "Auto's
# order"). On CPU tensors the torch backend steps through torch's fused kernel where it can (same-dtype state); the
# compiled kernel takes what it cannot, faster than torch foreach (docs/cpu-torch-backend.md).
FP32_PARAMS, SIXTEEN_BIT_PARAMS = "fp32 params", "16-bit params"
EIGHT_BIT_MOMENTS = storage_formats.EIGHT_BIT_MOMENTS.feature
# Moments (not 8-bit) or master weights in another dtype than the param: fp32 beside 16-bit params, bf16 beside fp32.
CONVERTED_STATE = "state in another dtype"
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("cuda", FP32_PARAMS): ("triton", "cupy", "torch"),
    ("cuda", SIXTEEN_BIT_PARAMS): ("cupy", "triton", "torch"),
    ("cuda", EIGHT_BIT_MOMENTS): ("triton", "cupy", "torch"),
    ("cpu", EIGHT_BIT_MOMENTS): ("cpu", "torch"),
    ("cpu", CONVERTED_STATE): ("cpu", "torch"),
}
DEFAULT_AUTO_ORDER: tuple[str, ...] = ("torch",)
_SIXTEEN_BIT = frozenset({torch.float16, torch.bfloat16})


def step_kinds(
    dtypes: Iterable[torch.dtype], features: Iterable[str] = (), converted_state: bool = False
) -> tuple[str, ...]:
    """What AUTO_ORDER is keyed by, most specific first: the moment formats the step needs a feature for (8-bit
    moments), state in another dtype than the params (``converted_state``), then whether every param is 16-bit."""
    dtypes = set(dtypes)
    kinds = sorted(set(features) & storage_formats.MOMENT_FEATURES)
    if converted_state:
        kinds.append(CONVERTED_STATE)
    kinds.append(SIXTEEN_BIT_PARAMS if dtypes and dtypes <= _SIXTEEN_BIT else FP32_PARAMS)
    return tuple(kinds)


def auto_order(
    device: torch.device, dtypes: Iterable[torch.dtype], features: Iterable[str] = (), converted_state: bool = False
) -> tuple[str, ...]:
    """The backends backend="auto" tries for such a step, in order: those of its first kind the device lists."""
    device_type = torch.device(device).type
    for kind in step_kinds(dtypes, features, converted_state):
        if (device_type, kind) in AUTO_ORDER:
            return AUTO_ORDER[device_type, kind]
    return DEFAULT_AUTO_ORDER


def check_backend_name(name: str) -> None:
    """Raise ValueError unless ``name`` is ``"auto"`` or a registered backend."""
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {_known_names()}")


def _known_names() -> str:
    return ", ".join([AUTO, *BACKENDS])


def requested_backend(name: str) -> str:
    """The backend ``backend=name`` asks for: ``name`` itself, or for ``"auto"`` the one the environment
    variable ADAM_GPU_BACKEND names (``"auto"`` when it is unset or empty).

    Raises ValueError for an unknown name, saying whether it came from the argument or the variable.
    """
    check_backend_name(name)
    if name != AUTO:
        return name
    chosen = os.environ.get(BACKEND_ENV_VAR) or AUTO
    if chosen != AUTO and chosen not in BACKENDS:
        raise ValueError(
            f"unknown backend {chosen!r} in the environment variable {BACKEND_ENV_VAR} "
            f"(it replaces backend='auto'); choose one of: {_known_names()}"
        )
    return chosen


def _unavailable(argument: str, name: str, reason: str) -> BackendUnavailableError:
    """The error for backend ``name``, asked for as ``backend=argument`` (``"auto"``: by the environment)."""
    message = f"backend {name} unavailable: {reason}"
    if argument == AUTO:
        message += f" (chosen by the environment variable {BACKEND_ENV_VAR}={name}, which replaces backend='auto')"
    return BackendUnavailableError(message)


def _missing_package(backend: Backend) -> str | None:
    """Why ``backend`` cannot be imported at all (its package is not installed), or None."""
    if backend.requires and importlib.util.find_spec(backend.requires) is None:
        return f"{backend.requires} is not installed ({backend.install_hint})"
    return None


def check_requested(name: str) -> None:
    """What an optimizer checks when it is built: ``name`` (or ADAM_GPU_BACKEND, for ``"auto"``) is a backend,
    and a backend asked for by name is installed. Whether it can run the tensors is known at the step.

    Raises ValueError for an unknown name, BackendUnavailableError for a backend that is not installed.
    """
    requested = requested_backend(name)
    if requested != AUTO:
        reason = _missing_package(BACKENDS[requested])
        if reason is not None:
            raise _unavailable(name, requested, reason)


# Optional capabilities a step may need (a moment format's, storage_formats.MOMENT_FEATURES); a backend module lists
# the ones it has in FEATURES.


def unavailable_reason(
    name: str, device: torch.device, dtypes: Iterable[torch.dtype], features: Iterable[str] = ()
) -> str | None:
    """None when backend ``name`` can update tensors of these dtypes on ``device`` with these features,
    else the reason."""
    backend = BACKENDS[name]
    missing_package = _missing_package(backend)
    if missing_package is not None:
        return missing_package
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
    requested: str,
    device: torch.device,
    dtypes: Iterable[torch.dtype],
    features: Iterable[str] = (),
    converted_state: bool = False,
) -> tuple[str, ModuleType]:
    """The backend that will run: ``requested`` itself, or for ``"auto"`` the one ADAM_GPU_BACKEND names, else the
    first available one of auto_order (``converted_state``: StepTensors.converted_state).

    Raises ValueError for an unknown name and BackendUnavailableError, with the reason, for a backend
    that cannot run these tensors (saying so when ADAM_GPU_BACKEND chose it).
    """
    dtypes, features = set(dtypes), set(features)
    name = requested_backend(requested)
    if name != AUTO:
        reason = unavailable_reason(name, device, dtypes, features)
        if reason is not None:
            raise _unavailable(requested, name, reason)
        return name, BACKENDS[name].load()
    for name in auto_order(device, dtypes, features, converted_state):
        if unavailable_reason(name, device, dtypes, features) is None:
            return name, BACKENDS[name].load()
    raise BackendUnavailableError(f"no backend can update {sorted(map(str, dtypes))} tensors on {device}")
