"""The tensors of one Adam step, and the checks that make them safe to hand to a kernel."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

# Storage dtypes the kernels read and write; math is fp32 whatever the storage.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class StepTensors:
    """Parallel lists: ``params[i]`` is updated from ``grads[i]`` with moments ``exp_avgs[i]``, ...

    ``max_exp_avg_sqs`` is empty unless the step uses amsgrad. ``masters`` is empty, or holds for each
    param its fp32 master copy, its int16 remainder (bf16 params: the lean master, see MASTER_MODES) or
    None.
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    exp_avgs: Sequence[torch.Tensor]
    exp_avg_sqs: Sequence[torch.Tensor]
    max_exp_avg_sqs: Sequence[torch.Tensor] = field(default_factory=list)
    masters: Sequence[torch.Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {p.dtype for p in self.params}

    def per_tensor(self) -> list[tuple[torch.Tensor, ...]]:
        """``(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None, master or None)`` for each param."""
        maxima = self.max_exp_avg_sqs or [None] * len(self.params)
        masters = self.masters or [None] * len(self.params)
        return list(zip(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, maxima, masters, strict=True))

    def check(self, amsgrad: bool) -> None:
        """Raise TypeError/ValueError naming the first tensor a kernel must not be given."""
        lists = {"grads": self.grads, "exp_avgs": self.exp_avgs, "exp_avg_sqs": self.exp_avg_sqs}
        if amsgrad:
            lists["max_exp_avg_sqs"] = self.max_exp_avg_sqs
        for name, tensors in lists.items():
            if len(tensors) != len(self.params):
                raise ValueError(f"{len(self.params)} params but {len(tensors)} {name}")
        if self.masters and len(self.masters) != len(self.params):
            raise ValueError(f"{len(self.params)} params but {len(self.masters)} masters")
        for index, (param, grad, *moments, master) in enumerate(self.per_tensor()):
            check_param(param, index)
            check_grad(param, grad, index)
            for moment in moments[: 3 if amsgrad else 2]:
                check_moment(param, moment, index)
            check_master(param, master, index)
        masters = [m for m in self.masters if m is not None]
        check_one_device(t for tensors in (self.params, *lists.values(), masters) for t in tensors)


# What a param's master tensor holds, by its dtype: 0 no master, 1 an fp32 copy, 2 the lean remainder.
MASTER_MODES = {None: 0, torch.float32: 1, torch.int16: 2}


def master_mode(param: torch.Tensor, master: torch.Tensor | None) -> int:
    return MASTER_MODES[None if master is None else master.dtype]


def check_master(param: torch.Tensor, master: object, index: int) -> None:
    if master is None:
        return
    if not isinstance(master, torch.Tensor) or master.dtype not in MASTER_MODES:
        raise TypeError(f"master {index} must be a float32 copy or an int16 remainder, got {master!r:.80}")
    if master.shape != param.shape:
        raise ValueError(f"master {index} has shape {tuple(master.shape)} but its param {tuple(param.shape)}")
    if master.dtype == torch.int16 and param.dtype != torch.bfloat16:
        raise TypeError(f"master {index} is a lean remainder (int16), which only bf16 params have, not {param.dtype}")


def check_one_device(tensors: Iterable[torch.Tensor]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"the tensors of one step (one param group) must be on one device, found {names}")


def check_param(param: object, index: int) -> None:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param {index} is a {type(param).__name__}, not a torch.Tensor")
    if param.is_complex() or not param.is_floating_point():
        raise TypeError(
            f"param {index} has dtype {param.dtype}: adam-gpu updates real floating-point params "
            "(float32, float16, bfloat16; float64 through the torch backend)"
        )
    if param.layout != torch.strided:
        raise TypeError(f"param {index} has layout {param.layout}: only dense (strided) params are supported")


def check_grad(param: torch.Tensor, grad: object, index: int) -> None:
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad {index} is a {type(grad).__name__}, not a torch.Tensor")
    if grad.is_sparse or grad.layout != torch.strided:
        raise TypeError(
            f"grad {index} is sparse ({grad.layout}): adam-gpu does not support sparse gradients, "
            "consider torch.optim.SparseAdam"
        )
    if grad.is_complex():
        raise TypeError(f"grad {index} is complex ({grad.dtype}): adam-gpu does not support complex gradients")
    if grad.dtype != param.dtype:
        raise TypeError(f"grad {index} has dtype {grad.dtype} but its param has dtype {param.dtype}")
    if grad.shape != param.shape:
        raise ValueError(f"grad {index} has shape {tuple(grad.shape)} but its param has shape {tuple(param.shape)}")


def check_moment(param: torch.Tensor, moment: object, index: int) -> None:
    if not isinstance(moment, torch.Tensor):
        raise TypeError(f"optimizer state {index} is a {type(moment).__name__}, not a torch.Tensor")
    if moment.shape != param.shape:
        raise ValueError(
            f"optimizer state {index} has shape {tuple(moment.shape)} but its param has shape {tuple(param.shape)}"
        )
    if moment.is_complex() or not moment.is_floating_point() or moment.layout != torch.strided:
        raise TypeError(f"optimizer state {index} has dtype {moment.dtype}: moments must be dense floating point")
