"""DTensor params (FSDP2's ``fully_shard``, tensor parallelism): the local shards the kernels update, and
the global gradient norm for fused clipping.

A DTensor has no data pointer of its own; its local shard (``to_local()``) shares its storage, so a kernel
that updates the shard in place updates the DTensor. The optimizer state stays in DTensors, as
torch.optim.AdamW keeps it, so ``state_dict`` and distributed checkpointing see torch's layout.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T", torch.Tensor, None)


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None while that module is not imported.

    No DTensor can exist before ``torch.distributed.tensor`` is imported, so it is looked up in
    ``sys.modules`` rather than imported: importing adam_gpu stays cheap, torch builds without
    ``torch.distributed`` work, and a step with no DTensor possible skips every check below."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def any_dtensor(tensors: Iterable[object]) -> bool:
    dtensor = dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def local(tensor: T) -> T:
    """The tensor a kernel gets: a DTensor's local shard (same storage), any other tensor (or None) itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_tensors(tensors: Sequence[T]) -> list[T]:
    dtensor = dtensor_type()
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def check_same_sharding(param: torch.Tensor, other: torch.Tensor, what: str, index: int) -> None:
    """``other`` (a grad or a state tensor) must be sharded like ``param``, or the kernel would pair
    elements of different shards (or read past a smaller shard)."""
    if dtensor_type() is None:
        return
    if is_dtensor(param) != is_dtensor(other):
        kinds = ["a DTensor" if is_dtensor(t) else "a plain tensor" for t in (param, other)]
        raise TypeError(f"param {index} is {kinds[0]} but its {what} is {kinds[1]}: both must be DTensors or neither")
    if is_dtensor(param) and local(other).shape != local(param).shape:
        raise ValueError(
            f"{what} {index} is sharded as {other.placements} (local shape {tuple(local(other).shape)}) but its "
            f"param as {param.placements} (local shape {tuple(local(param).shape)}): they must be sharded alike"
        )


def global_norm(grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, float32 on ``device``, as torch.nn.utils.clip_grad_norm_ computes
    it (but with the per-tensor norms in fp32 for bf16/fp16 grads): a DTensor grad counts with all its
    shards (one all-reduce per device mesh); a plain grad counts once, as a replicated tensor (DDP, or a
    module that is not sharded)."""
    plain: dict[torch.device, list[torch.Tensor]] = {}
    sharded: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        if is_dtensor(grad):
            sharded.setdefault(grad.device_mesh, []).append(grad)
        else:
            plain.setdefault(grad.device, []).append(grad)
    norms = [norm.to(device) for same_device in plain.values() for norm in _fp32_norms(same_device)]
    for same_mesh in sharded.values():
        # Each rank's norms cover its shards (partial DTensors); full_tensor() reduces the vector of them
        # over the mesh in one all-reduce, giving each tensor's global norm.
        norms += torch.stack(_fp32_norms(same_mesh)).full_tensor().to(device).unbind()
    # Summed in sorted order, so that the bits depend neither on the order of the groups and params nor on
    # the sharding.
    return torch.linalg.vector_norm(torch.stack(norms).to(torch.float32).sort().values)


def _fp32_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's 2-norm in fp32, whatever its dtype: a bf16/fp16 norm (clip_grad_norm_'s) is off by up
    to 2**-9 / 2**-12, which the clip coefficient carries into every update (the property tests found an
    fp16 case 25 ulps off through the L2 decay's cancellation)."""
    return list(torch._foreach_norm(tensors, dtype=torch.float32))


def clip_coefficient(
    grads: Sequence[torch.Tensor], max_norm: float, grad_scale: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` of all ``grads`` together (``global_norm``; grads scaled by AMP measured
    unscaled by ``grad_scale``), float32 on ``device``, as torch.nn.utils.clip_grad_norm_ computes it."""
    total = global_norm(grads, device)
    if grad_scale is not None:
        total = total / grad_scale.to(device)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)
