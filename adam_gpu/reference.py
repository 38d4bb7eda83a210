"""Textbook Adam in float64: the oracle every kernel is tested against.

Written from the equations, not from any implementation, one element-wise expression per line:

    g      = -grad if maximize else grad
    g      = g + weight_decay * p                 (Adam: L2 term)
    p      = p * (1 - lr * weight_decay)          (AdamW: decoupled decay)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g^2
    v_max  = max(v_max, v)                        (amsgrad: the denominator uses v_max)
    m_hat  = m / (1 - beta1^t)
    v_hat  = v / (1 - beta2^t)
    p      = p - lr * m_hat / (sqrt(v_hat) + eps)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from adam_gpu.hyperparameters import AdamHyperparameters


class AdamState(NamedTuple):
    """Param and moments after a step, all float64."""

    param: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None


def reference_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    step: int,
    hp: AdamHyperparameters,
) -> AdamState:
    """One Adam step at step number ``step`` (1-based, already incremented), computed in float64.

    The inputs are read, never written; the outputs are new float64 tensors.
    """
    p, g, m, v = (t.detach().to(torch.float64) for t in (param, grad, exp_avg, exp_avg_sq))
    if hp.maximize:
        g = -g
    if hp.weight_decay != 0:
        if hp.decoupled:
            p = p * (1 - hp.lr * hp.weight_decay)
        else:
            g = g + hp.weight_decay * p
    m = hp.beta1 * m + (1 - hp.beta1) * g
    v = hp.beta2 * v + (1 - hp.beta2) * g * g
    v_max = None
    v_used = v
    if hp.amsgrad:
        assert max_exp_avg_sq is not None, "amsgrad needs max_exp_avg_sq"
        v_max = torch.maximum(max_exp_avg_sq.detach().to(torch.float64), v)
        v_used = v_max
    m_hat = m / (1 - hp.beta1**step)
    v_hat = v_used / (1 - hp.beta2**step)
    p = p - hp.lr * m_hat / (torch.sqrt(v_hat) + hp.eps)
    return AdamState(p, m, v, v_max)
