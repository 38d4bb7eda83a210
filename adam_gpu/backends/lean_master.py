"""The lean master of a bf16 param: fp32 bits held as the bf16 param (the high half, rounded) and an int16 remainder.

The remainder is the value's low 16 bits as they are, the param its high 16 bits plus one where the low half is
0x8000 or more (rounded half up on the bits, as the kernels do), so ``(param << 16) + remainder`` is the value again.
Both directions are a few 32-bit integer passes; on the CPU no selects (a select costs several passes there).
``joined`` and ``split`` are the torch backend's entry for every master mode that splits its param's bits
(storage_formats.MasterMode.splits_param), by the master's dtype: the lean master is the one there is.
"""

from __future__ import annotations

import torch

from adam_gpu.kernel_abi import Master
from adam_gpu.storage_formats import master_of


def lean_master(param: torch.Tensor, remainder: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 whose bits are the bf16 param's bits << 16 plus the signed int16 remainder (into ``out``)."""
    out = torch.empty(param.shape, dtype=torch.float32, device=param.device) if out is None else out
    bits = out.view(torch.int32)
    return bits.copy_(param.view(torch.int16)).bitwise_left_shift_(16).add_(remainder).view(torch.float32)


def split_lean_master(
    value: torch.Tensor, param: torch.Tensor | None = None, remainder: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 param, int16 remainder) with ``lean_master(param, remainder) == value`` bit for bit (into ``param`` and
    ``remainder`` where given); a NaN keeps its high half, made quiet, and the remainder makes it whole."""
    if param is None:
        param = torch.empty(value.shape, dtype=torch.bfloat16, device=value.device)
    if remainder is None:
        remainder = torch.empty(value.shape, dtype=torch.int16, device=value.device)
    bits, param_bits = value.view(torch.int32), param.view(torch.int16)
    remainder.copy_(bits)  # (int32 to int16 keeps the low half)
    param_bits.copy_((bits + 0x8000).bitwise_right_shift_(16))
    if value.device.type != "cpu":  # (a select: testing for NaN first would wait for the device)
        param_bits.copy_(torch.where(value.isnan(), (bits >> 16) | 0x40, param_bits))
    elif value.sum().isnan():  # (one cheap pass; a sum of infinities may send the rare case here too)
        nan = value.isnan()
        param_bits[nan] = (bits[nan] >> 16).to(torch.int16) | 0x40
    return param, remainder


# Each splitting master mode's ops, by its kernel mode: (fp32 value of a param and master, the pair of a value).
_SPLIT_OPS = {Master.LEAN_MASTER: (lean_master, split_lean_master)}


def joined(param: torch.Tensor, master: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 value a param and its splitting master hold (into ``out``)."""
    return _SPLIT_OPS[master_of(master.dtype).kernel][0](param, master, out)


def split(
    value: torch.Tensor,
    master_dtype: torch.dtype,
    param: torch.Tensor | None = None,
    master: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(param, master) of the fp32 ``value`` in the splitting mode of masters of ``master_dtype`` (into ``param``
    and ``master`` where given)."""
    return _SPLIT_OPS[master_of(master_dtype).kernel][1](value, param, master)
