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

from adam_gpu.step_tensors import EIGHT_BIT

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

# What backend="auto" tries, in order, by device type and the kind of step (step_kind); a pair not listed gets
# the default order. CUDA, measured side by side (benchmarks/results/2026-11-26-h200, before the launch
# configurations were tuned): triton leads fp32 params (GPT-2 124M 0.861 ms a step vs cupy's 0.922, Llama-3.2-1B
# 8.36 vs 8.94) and 8-bit moments (0.904 vs 1.41, 8.70 vs 13.7); cupy leads 16-bit params (0.637 vs 0.843, 4.72
# vs 5.72, ResNet-50 as a CUDA graph 0.113 vs 0.148; the tuned triton still trailed it on one bf16 tensor of
# 2^28 elements, 1.04 ms vs 0.98). With the tuned configurations (benchmarks/results/2026-11-26-h200-tuned) the
# order holds: fp32 triton 0.835 vs 0.894 and 8.14 vs 8.78, 8-bit 0.923 vs 1.37, bf16 cupy 0.471 vs 0.545.
FP32_PARAMS, SIXTEEN_BIT_PARAMS, EIGHT_BIT_MOMENTS = "fp32 params", "16-bit params", EIGHT_BIT
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("cuda", FP32_PARAMS): ("triton", "cupy", "torch"),
    ("cuda", SIXTEEN_BIT_PARAMS): ("cupy", "triton", "torch"),
    ("cuda", EIGHT_BIT_MOMENTS): ("triton", "cupy", "torch"),
}
DEFAULT_AUTO_ORDER: tuple[str, ...] = ("torch",)
_SIXTEEN_BIT = frozenset({torch.float16, torch.bfloat16})


def step_kind(dtypes: Iterable[torch.dtype], features: Iterable[str] = ()) -> str:
    """What AUTO_ORDER is keyed by: 8-bit moments (the step needs that feature), else whether every param is
    16-bit."""
    if EIGHT_BIT_MOMENTS in set(features):
        return EIGHT_BIT_MOMENTS
    dtypes = set(dtypes)
    return SIXTEEN_BIT_PARAMS if dtypes and dtypes <= _SIXTEEN_BIT else FP32_PARAMS


def auto_order(device: torch.device, dtypes: Iterable[torch.dtype], features: Iterable[str] = ()) -> tuple[str, ...]:
    """The backends backend="auto" tries for such a step, in order."""
    return AUTO_ORDER.get((torch.device(device).type, step_kind(dtypes, features)), DEFAULT_AUTO_ORDER)


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
    for name in auto_order(device, dtypes, features):
        if unavailable_reason(name, device, dtypes, features) is None:
            return name, BACKENDS[name].load()
    raise BackendUnavailableError(f"no backend can update {sorted(map(str, dtypes))} tensors on {device}")
