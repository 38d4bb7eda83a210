"""The functional Adam step, mirroring ``torch.optim.adam.adam``: lists of tensors in, updated in place."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from adam_gpu import dispatch
from adam_gpu.device_inputs import FOUND_INF, DeviceInputs
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.sharded import local_tensors
from adam_gpu.step_tensors import StepTensors, check_step_count


def fused_adam(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
    backend: str = dispatch.AUTO,
    masters: Sequence[torch.Tensor | None] | None = None,
    exp_avg_absmaxes: Sequence[torch.Tensor | None] | None = None,
    exp_avg_sq_absmaxes: Sequence[torch.Tensor | None] | None = None,
) -> str | None:
    """One Adam (``decoupled=False``) or AdamW (``decoupled=True``) step over every tensor, in place.

    Like torch's functional ``adam``, each ``state_steps[i]`` (a 1-element tensor) is incremented first
    and the step uses the incremented count. ``max_exp_avg_sqs`` may be empty unless ``amsgrad``. All
    tensors must be on one device. ``masters`` (optional) gives each param an fp32 master copy, an int16
    lean remainder (bf16 params) or None: the step then updates the master and writes the param as its
    rounding. 8-bit moments: ``exp_avgs``/``exp_avg_sqs`` hold uint8 codes and ``exp_avg_absmaxes``/
    ``exp_avg_sq_absmaxes`` the fp32 absmax of each block (see adam_gpu.quantization).
    DTensors (FSDP2) are updated through their local shards.
    Returns the name of the backend that ran (None for no params).
    Everything is checked before anything is written: on an error, params and state are untouched.
    """
    hp = AdamHyperparameters(float(lr), beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize)
    # A DTensor has no data pointer of its own (a kernel given one would read a wild address): its local
    # shard shares its storage; the checks then compare the local shapes.
    tensors = StepTensors(
        *map(local_tensors, (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [])),
        local_tensors(masters or []),
        exp_avg_absmaxes or [],
        exp_avg_sq_absmaxes or [],
    )
    written = tensors.check(amsgrad)
    check_state_steps(state_steps, len(tensors))
    tensors.copy_grads(written.aliased_grads(tensors.grads))
    if not len(tensors):
        dispatch.requested_backend(backend)  # an unknown name is refused even with nothing to step
        return None
    name, module = dispatch.resolve(backend, tensors.device, tensors.dtypes, tensors.features, tensors.converted_state)
    apply_step(module, tensors, state_steps, hp)
    return name


def check_state_steps(state_steps: Sequence[torch.Tensor], count: int) -> None:
    if len(state_steps) != count:
        raise ValueError(f"{count} params but {len(state_steps)} state_steps")
    for index, step in enumerate(state_steps):
        check_step_count(step, f"state_steps[{index}]")


def apply_step(
    backend: ModuleType,
    tensors: StepTensors,
    state_steps: Sequence[torch.Tensor],
    hp: AdamHyperparameters,
    device_inputs: DeviceInputs | None = None,
    step_buffer: torch.Tensor | None = None,
) -> None:
    """Increment the step counts, then let ``backend`` update params and moments (inputs already checked).

    Host step counts (torch's non-capturable layout) are read as floats, which does not synchronize;
    ``step_buffer``, when given, is one tensor whose elements are exactly ``state_steps`` in order (see
    ``shared_step_buffer``), on the host or the device: read and incremented in one op each. Step counts on the device
    (``device_inputs.steps``) are incremented and read on the device; when found_inf is set the increment
    is taken back on the device too, as torch's fused Adam does."""
    if device_inputs is not None and device_inputs.steps is not None:
        # (One buffer: one kernel for each add, where a foreach over 1000 counts launches about ten.)
        counts = [step_buffer] if step_buffer is not None else list(state_steps)
        torch._foreach_add_(counts, 1.0)
        try:
            backend.adam_step(tensors, None, hp, device_inputs)
        except BaseException:
            torch._foreach_sub_(counts, 1.0)  # the step did not happen: the count stays
            raise
        if device_inputs.grad_scaling:
            torch._foreach_sub_(counts, device_inputs.values[FOUND_INF])
        return
    # Host step counts are incremented only once the backend has run: a step that raises does not count.
    # One buffer read by tolist() and added to once, not each count: docs/benchmarks.md, "Host step counts".
    counts = list(state_steps)
    values = step_buffer.tolist() if step_buffer is not None else [step.item() for step in counts]
    steps = [value + 1 for value in values]
    if device_inputs is None:
        backend.adam_step(tensors, steps, hp)
    else:
        backend.adam_step(tensors, steps, hp, device_inputs)
    if step_buffer is not None:
        step_buffer.add_(1.0)
    elif counts:
        torch._foreach_add_(counts, 1)  # (an int: a count put in the state as an integer tensor steps as in torch)


def shared_step_buffer(state_steps: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D tensor whose elements, in order, ``state_steps`` are views of (FusedAdam creates a group's step
    counts so), or None: incrementing it increments each of them."""
    base = state_steps[0]._base if state_steps else None
    if base is None or base.dim() != 1 or base.numel() != len(state_steps) or not base.is_contiguous():
        return None
    if not all(step._base is base and step.dim() == 0 and step.dtype == base.dtype for step in state_steps):
        return None
    start, size = base.data_ptr(), base.element_size()
    return base if [step.data_ptr() for step in state_steps] == list(range(start, start + base.nbytes, size)) else None
