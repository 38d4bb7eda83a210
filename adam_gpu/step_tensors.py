"""The tensors of one Adam step, and the checks that make them safe to hand to a kernel."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from adam_gpu.quantization import BLOCK as QUANT_BLOCK

# Features a backend may lack (its module's FEATURES lists those it has; adam_gpu.dispatch checks them).
EIGHT_BIT = "8-bit moments"

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
    # 8-bit moments: exp_avgs/exp_avg_sqs hold uint8 codes and these the fp32 absmax of each block of
    # adam_gpu.quantization.BLOCK elements (None for a tensor whose moments are not quantized).
    exp_avg_absmaxes: Sequence[torch.Tensor | None] = field(default_factory=list)
    exp_avg_sq_absmaxes: Sequence[torch.Tensor | None] = field(default_factory=list)
    # Where a backend may keep what it derives from these tensors' addresses, dtypes, shapes and layouts (the
    # tensor tables); a caller passes the same dict again only with tensors alike in all of these, but for the
    # grads, which may be other tensors of the same dtypes and shapes (their addresses and contiguity are read
    # every step), as FusedAdam does while a group's params and state are unchanged (adam_gpu.step_signature).
    # None: derive everything anew.
    memo: dict | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {p.dtype for p in self.params}

    @property
    def features(self) -> set[str]:
        """The optional capabilities (adam_gpu.dispatch) a backend needs for these tensors."""
        return {EIGHT_BIT} if any(a is not None for a in self.exp_avg_absmaxes) else set()

    def lists(self) -> tuple[Sequence[torch.Tensor | None], ...]:
        """Every list, in the order of the fields (``StepTensors(*lists)`` rebuilds them, without the memo)."""
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.masters,
                self.exp_avg_absmaxes, self.exp_avg_sq_absmaxes)  # fmt: skip

    def per_tensor(self) -> list[tuple[torch.Tensor, ...]]:
        """``(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, exp_avg_absmax, exp_avg_sq_absmax)``
        for each param, None where a tensor has no such part."""
        none = [None] * len(self.params)
        optional = (self.max_exp_avg_sqs, self.masters, self.exp_avg_absmaxes, self.exp_avg_sq_absmaxes)
        return list(zip(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, *(o or none for o in optional),
                        strict=True))  # fmt: skip

    def check(self, amsgrad: bool) -> None:
        """Raise TypeError/ValueError naming the first tensor a kernel must not be given."""
        lists = {"grads": self.grads, "exp_avgs": self.exp_avgs, "exp_avg_sqs": self.exp_avg_sqs}
        if amsgrad:
            lists["max_exp_avg_sqs"] = self.max_exp_avg_sqs
        for name, tensors in lists.items():
            if len(tensors) != len(self.params):
                raise ValueError(f"{len(self.params)} params but {len(tensors)} {name}")
        for name, optional in (("masters", self.masters), ("exp_avg_absmaxes", self.exp_avg_absmaxes),
                               ("exp_avg_sq_absmaxes", self.exp_avg_sq_absmaxes)):  # fmt: skip
            if optional and len(optional) != len(self.params):
                raise ValueError(f"{len(self.params)} params but {len(optional)} {name}")
        for index, (param, grad, exp_avg, exp_avg_sq, maximum, master, *absmaxes) in enumerate(self.per_tensor()):
            check_param(param, index)
            check_grad(param, grad, index)
            moments = [exp_avg, exp_avg_sq, maximum][: 3 if amsgrad else 2]
            for moment, absmax in zip(moments, [*absmaxes, None], strict=False):
                check_moment(param, moment, index, absmax)
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
    if param.layout != torch.strided or param.is_nested:
        kind = "nested" if param.is_nested else param.layout
        raise TypeError(f"param {index} has layout {kind}: only dense (strided) params are supported")


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


def check_moment(param: torch.Tensor, moment: object, index: int, absmax: object = None) -> None:
    if not isinstance(moment, torch.Tensor):
        raise TypeError(f"optimizer state {index} is a {type(moment).__name__}, not a torch.Tensor")
    if moment.is_nested:  # (it has no shape to compare: torch raises an internal error on .shape)
        raise TypeError(f"optimizer state {index} is a nested tensor: moments must be dense")
    if moment.shape != param.shape:
        raise ValueError(
            f"optimizer state {index} has shape {tuple(moment.shape)} but its param has shape {tuple(param.shape)}"
        )
    if moment.dtype == torch.uint8:  # 8-bit codes: their blocks' absmax must come with them
        blocks = -(-moment.numel() // QUANT_BLOCK)
        fits = isinstance(absmax, torch.Tensor) and absmax.dtype == torch.float32 and not absmax.is_nested
        if not fits or absmax.numel() != blocks or absmax.layout != torch.strided:
            raise ValueError(f"8-bit optimizer state {index} needs an fp32 absmax of {blocks} blocks, got {absmax!r}")
        return
    if moment.is_complex() or not moment.is_floating_point() or moment.layout != torch.strided:
        raise TypeError(f"optimizer state {index} has dtype {moment.dtype}: moments must be dense floating point")
