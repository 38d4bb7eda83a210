"""Per-step inputs that stay on the device, so that ``step()`` never waits for it: the capturable mode
(lr and step counts on the device, replayable in a CUDA graph), AMP (GradScaler's scale and found_inf)
and fused gradient clipping (the clip coefficient)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adam_gpu.kernel_abi import DEVICE_SCALARS, DeviceScalar

# The layout of DeviceInputs.values, as the kernels read it.
LR, GRAD_MULTIPLIER, FOUND_INF = (int(DeviceScalar[name]) for name in ("LR", "GRAD_MULTIPLIER", "FOUND_INF"))


@dataclass(frozen=True)
class DeviceInputs:
    """``values`` is float32 [DEVICE_SCALARS] on the params' device: lr, the factor every grad is multiplied by
    (1 / grad scale x clip coefficient), and found_inf (non-zero: the step writes nothing).
    ``steps``: each tensor's step count on the device (capturable mode; the kernels then form the bias
    corrections themselves), or None when step counts are on the host."""

    values: torch.Tensor
    steps: Sequence[torch.Tensor] | None
    grad_scaling: bool  # whether the grad multiplier and found_inf apply


def is_capturing(device: torch.device) -> bool:
    """Whether work queued on ``device`` now is being captured into a CUDA graph (not run)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


@functools.cache
def unused_values(device: torch.device) -> torch.Tensor:
    """What a kernel's device-scalars argument points to when no DeviceInputs apply (never read then)."""
    return torch.zeros(DEVICE_SCALARS, dtype=torch.float32, device=device)


def device_values(
    lr: float | torch.Tensor,
    device: torch.device,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coefficient: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assemble ``DeviceInputs.values`` with device ops only: no host synchronization, and nothing a CUDA graph
    would copy from host memory. (``values[LR] = 1e-3`` makes the number a CPU tensor when ``values`` is on a GPU
    and copies it, which torch refuses while capturing; ``fill_`` passes it as a kernel argument.)"""
    values = torch.zeros(DEVICE_SCALARS, dtype=torch.float32, device=device)
    if isinstance(lr, torch.Tensor):
        values[LR] = lr
    else:
        values[LR].fill_(float(lr))
    multiplier = torch.ones((), dtype=torch.float32, device=device)
    if grad_scale is not None:
        multiplier = multiplier / grad_scale.to(device=device, dtype=torch.float32)
    if clip_coefficient is not None:
        multiplier = multiplier * clip_coefficient.to(device=device, dtype=torch.float32)
    values[GRAD_MULTIPLIER] = multiplier
    if found_inf is not None:
        values[FOUND_INF] = found_inf.to(device=device, dtype=torch.float32)
    return values
