"""The hyper-parameters of one Adam step, validated once and shared by every backend and the reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    def step_scalars(self, step: float) -> tuple[float, float]:
        """``(lr / (1 - beta1**step), sqrt(1 - beta2**step))``, in float64 on the host, as torch computes them."""
        bias_correction1 = 1.0 - self.beta1**step
        bias_correction2 = 1.0 - self.beta2**step
        return self.lr / bias_correction1, math.sqrt(bias_correction2)


def check_hyperparameters(lr: object, betas: object, eps: object, weight_decay: object) -> None:
    """Raise ``ValueError`` naming the first hyper-parameter that torch.optim.Adam would also reject."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr must be a number or a 1-element tensor, got a tensor of shape {tuple(lr.shape)}")
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
