"""The hyper-parameters of one Adam step, validated once and shared by every backend and the reference."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class AdamHyperparameters:
    """What one Adam/AdamW step needs besides the tensors.

    ``decoupled`` selects AdamW's weight decay (``p *= 1 - lr * weight_decay``) over Adam's L2 term
    (``g += weight_decay * p``); ``amsgrad`` and ``maximize`` are as in ``torch.optim.Adam``.
    """

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool = False
    amsgrad: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        check_hyperparameters(self.lr, (self.beta1, self.beta2), self.eps, self.weight_decay)

    def step_scalars(self, step: float) -> StepScalars:
        """The per-step scalars of step number ``step`` (1-based), computed in float64 on the host.

        Kernels do fp32 math, so every derived scalar is formed here first: ``1 - beta2`` formed in
        fp32 from a rounded beta2 = 0.999 is off by 1.3e-5 relative, here by at most an fp32 rounding.
        """
        head, tail = self._constant_scalars
        return StepScalars(*head, self.lr / (1.0 - self.beta1**step), math.sqrt(1.0 - self.beta2**step), *tail)

    @functools.cached_property
    def _constant_scalars(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The StepScalars that do not depend on the step: those before step_size, and those after
        bias_correction2_sqrt."""
        head = StepScalars._make([0.0] * len(StepScalars._fields))._replace(
            one_minus_beta1=1.0 - self.beta1,
            one_minus_beta2=1.0 - self.beta2,
            eps=self.eps,
            l2_weight_decay=0.0 if self.decoupled else self.weight_decay,
            param_decay=1.0 - self.lr * self.weight_decay if self.decoupled else 1.0,
            decoupled_weight_decay=self.weight_decay if self.decoupled else 0.0,
            ln_beta1=_ln(self.beta1),
            ln_beta2=_ln(self.beta2),
        )
        step_size = StepScalars._fields.index("step_size")
        assert StepScalars._fields[step_size + 1] == "bias_correction2_sqrt"
        return head[:step_size], head[step_size + 2 :]


def _ln(beta: float) -> float:
    return -math.inf if beta == 0 else math.log(beta)


class StepScalars(NamedTuple):
    """What a kernel needs for one step, in the order the kernels take them.

    ``g += l2_weight_decay * p`` (Adam); ``p *= param_decay`` (AdamW);
    ``m += one_minus_beta1 * (g - m)``; ``v += one_minus_beta2 * (g * g - v)``;
    ``p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)``.

    With the step count and lr on the device (capturable mode) the kernel forms the last three itself:
    ``step_size = lr / -expm1(step * ln_beta1)``, ``bias_correction2_sqrt = sqrt(-expm1(step * ln_beta2))``
    and ``param_decay = 1 - lr * decoupled_weight_decay``. ``1 - beta**step`` as ``-expm1`` because
    ``1 - exp(...)`` cancels in fp32: with beta2 = 0.99999 at step 1 it put a 6.7e-4 relative error in
    the step (found by tests/test_properties.py); torch's capturable Adam, ``1 - beta2 ** step`` in fp32,
    has that error.

    The moment updates are the textbook ``m = beta1 * m + (1 - beta1) * g`` written as a lerp: in fp32,
    0.9 is stored 2e-8 off while ``1 - fp32(0.1)`` is 1.5e-9 off, and over 20 steps the textbook form
    drifted 3x further from the float64 trajectory than torch's lerp (measured on 4097 elements).
    """

    one_minus_beta1: float
    one_minus_beta2: float
    eps: float
    l2_weight_decay: float
    param_decay: float
    step_size: float
    bias_correction2_sqrt: float
    decoupled_weight_decay: float
    ln_beta1: float
    ln_beta2: float


def check_tensor_hyperparameters(lr: object, betas: object, foreach: object, capturable: object) -> None:
    """Raise ``ValueError`` with torch.optim.Adam's own message where it refuses a tensor lr or betas (torch's
    optimizer tests match these): tensors of one element, not with ``foreach=True`` unless ``capturable``
    (adam-gpu ignores ``foreach`` but refuses what torch refuses), and betas both floats or both tensors."""
    pair = list(betas) if isinstance(betas, (tuple, list)) and len(betas) == 2 else []
    tensors = [isinstance(beta, torch.Tensor) for beta in pair]
    if any(tensors) and not all(tensors):
        raise ValueError("betas must be either both floats or both Tensors")
    for name, value in [("lr", lr), *((f"betas[{i}]", beta) for i, beta in enumerate(pair))]:
        if isinstance(value, torch.Tensor):
            if foreach and not capturable:
                raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")
            if value.numel() != 1:
                raise ValueError(f"Tensor {name} must be 1-element")


def check_hyperparameters(lr: object, betas: object, eps: object, weight_decay: object) -> None:
    """Raise ``ValueError`` naming the first hyper-parameter that torch.optim.Adam would also reject."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {float(lr)} (must be >= 0)")
    if not 0.0 <= float(eps):
        raise ValueError(f"Invalid epsilon value: {float(eps)} (must be >= 0)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {float(beta)} (must be in [0, 1))")
    if not 0.0 <= float(weight_decay):
        raise ValueError(f"Invalid weight_decay value: {float(weight_decay)} (must be >= 0)")
