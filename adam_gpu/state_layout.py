"""The check a state_dict passes before ``load_state_dict`` writes anything (the state keys of each storage
format are adam_gpu.storage_formats').

torch.optim loads any state_dict whose group sizes match and fails later, at ``step()``, on a missing or
misshapen moment (a state_dict from another model with as many params, a truncated file). FusedAdam
checks every saved param's state against its param first, so a bad state_dict raises a clear error and
leaves the optimizer as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from adam_gpu.step_tensors import check_master, check_moment
from adam_gpu.storage_formats import MASTER_KEYS, MASTERED_DTYPES, PLAIN_KEYS, SCALED_FORMATS


def check_loadable(state_dict: object, param_groups: list[dict[str, Any]]) -> None:
    """Raise ValueError/TypeError, naming the group, the param and the entry, unless ``state_dict`` has
    this optimizer's groups and sizes and every saved param state holds a step and the moments its
    group's options need, each shaped like its param."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups' entries")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"the state_dict has {len(saved_groups)} param groups but this optimizer has {len(param_groups)}"
        )
    for group_index, (saved_group, group) in enumerate(zip(saved_groups, param_groups, strict=True)):
        if len(saved_group["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {group_index} of the state_dict has {len(saved_group['params'])} params "
                f"but this optimizer's has {len(group['params'])}"
            )
        amsgrad = bool(saved_group.get("amsgrad", group["amsgrad"]))
        for index, (saved_id, param) in enumerate(zip(saved_group["params"], group["params"], strict=True)):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            try:
                _check_param_state(saved, param, index, amsgrad)
            except (TypeError, ValueError) as error:
                raise type(error)(f"cannot load the state of param {index} of group {group_index}: {error}") from None


def _check_param_state(saved: Mapping[str, object], param: torch.Tensor, index: int, amsgrad: bool) -> None:
    step = saved.get("step")
    if not isinstance(step, torch.Tensor | int | float) or (isinstance(step, torch.Tensor) and step.numel() != 1):
        raise ValueError(f"'step' must be a number or a 1-element tensor, got {step!r:.80}")
    for moment, key in enumerate(PLAIN_KEYS[: 3 if amsgrad else 2]):
        if key in saved:
            check_moment(param, saved[key], index)
            continue
        scaled = [f for f in SCALED_FORMATS if moment < 2 and f.keys[moment] in saved]
        if not scaled:
            raise ValueError(f"{key!r} is missing (the state has {sorted(saved)})")
        fmt = scaled[0]
        check_moment(param, saved[fmt.keys[moment]], index, saved.get(fmt.scale.keys[moment]))
    for key in MASTER_KEYS:
        if key in saved and not master_cast_away(saved[key]):
            check_master(param, saved[key], index)


def master_cast_away(master: object) -> bool:
    """Whether a saved master is one a torch.optim optimizer cast to its 16-bit param's dtype when it loaded this
    adam-gpu state (it casts every floating-point state tensor): no longer a master, so FusedAdam discards it and
    takes the param as truth."""
    return isinstance(master, torch.Tensor) and master.dtype in MASTERED_DTYPES
