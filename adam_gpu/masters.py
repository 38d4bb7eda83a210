"""Master weights never undo what the user wrote into a param: a master is re-seeded from its param wherever the
param no longer is the master's rounding.

A step writes a 16-bit param as the rounding of its master; between steps the user may write the param
(``p.copy_(...)``, ``p.fill_``, ``model.load_state_dict``, ``p.data = ...``), and the next step must start from
what they wrote. torch counts in-place writes to a tensor in ``param._version`` (the kernels' own writes do not
count: they are recorded after each step), so a step verifies only the params written since: an fp32 master that
no longer rounds to its param is replaced by the param; a lean remainder is zeroed (the param then is the master
exactly, as the fp32 master re-seeded is). Params whose writes torch does not count (through ``p.data``, which
has a counter of its own) keep their masters: write the param itself, under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from adam_gpu.storage_formats import master_of

Mark = tuple[int, int]  # a param's (_version, data_ptr()) after a step wrote it


def mark(param: torch.Tensor) -> Mark:
    return param._version, param.data_ptr()


def rounds_to(master: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``param`` is bit for bit its fp32 master rounded to its dtype (NaN included)."""
    rounded = master.to(param.dtype)
    return torch.equal(rounded.view(torch.int16), param.detach().view(torch.int16))


def reseed_stale(
    keys: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor | None],
    marks: WeakTensorKeyDictionary,
) -> None:
    """Re-seed from its param each master the user's writes made stale, by ``marks`` (by ``keys``, the params as
    the optimizer holds them: ``params`` are what the kernels get, a DTensor's local shard): each param's ``mark``
    after the last step wrote it. An fp32 master whose param is not its rounding takes the param's value (also
    where no mark is known: after a state_dict was loaded, say); a lean remainder (a master that splits its param:
    storage_formats.MasterMode) whose param was written becomes 0."""
    for key, param, master in zip(keys, params, masters, strict=True):
        if master is None:
            continue
        known = marks.get(key)
        if known is not None and known == mark(param):
            continue
        if master_of(master.dtype).splits_param:
            if known is not None:  # (with no mark to go by, a split master always rounds to its param: kept)
                master.zero_()
        elif not rounds_to(master, param):
            master.copy_(param.detach())


def record(
    keys: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor | None],
    marks: WeakTensorKeyDictionary,
) -> None:
    """Note the mark of each param with a master, just after a step wrote it."""
    for key, param, master in zip(keys, params, masters, strict=True):
        if master is not None:
            marks[key] = mark(param)
