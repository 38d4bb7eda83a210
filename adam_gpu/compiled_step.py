"""``FusedAdam.step`` as torch.compile traces it: state gathered at trace time, one custom op per param group.

Dynamo runs an optimizer's ``_init_group`` eagerly while tracing instead of tracing it (as for torch's own
optimizers): ``init_group`` checks the group, creates its missing state exactly as the eager step does, and hands
back the tensors, which dynamo then guards and passes to the graph as inputs. ``traced_step`` is what dynamo sees
in place of the eager step: that, and ``adam_gpu::adam_step_`` (adam_gpu.custom_op) for each group, so a compiled
training step has no graph break at ``optimizer.step()``, and the kernels run as in the eager step, one launch per
group. A tensor lr (changed in place by a scheduler) is an input of the graph, not a constant: changing it
recompiles nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from adam_gpu import custom_op

if TYPE_CHECKING:
    from adam_gpu.optim import FusedAdam

# What init_group hands back for a group with grads, constants to the graph: the resolved backend's name, where
# the params with masters and with 8-bit moments are (custom_op.present), capturable, and the hyper-parameters
# after lr in adam_step_'s order. (Dynamo's view of a group reads capturable as True, whatever the group holds.)
GroupPlan = tuple[str, list[int], list[int], bool, float, float, float, float, bool, bool, bool]


def traced_step(optimizer: FusedAdam, closure: Callable[[], float] | None = None) -> float | None:
    """The step that dynamo traces for ``optimizer.step(closure)``."""
    if optimizer.defaults["differentiable"]:
        return torch.optim.Adam.step(optimizer, closure)
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    gathered = []
    for group in optimizer.param_groups:
        lists: tuple[list, ...] = ([], [], [], [], [], [], [], [], [])  # as adam_step_ takes them
        gathered.append((group, lists, optimizer._init_group(group, *lists)))
    grads = [grad for _, lists, plan in gathered if plan is not None for grad in lists[1]]
    grad_scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
    clip = None
    if optimizer.max_grad_norm is not None and grads:
        clip = custom_op.clip_coefficient(grads, float(optimizer.max_grad_norm), grad_scale)
    for group, lists, plan in gathered:
        if plan is None:
            continue
        backend, master_indices, quantized_indices, capturable, *hyperparameters = plan
        lr = group["lr"]
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        custom_op.adam_step_(
            *lists,
            master_indices,
            quantized_indices,
            0.0 if lr_tensor is not None else lr,
            lr_tensor,
            *hyperparameters,
            capturable,
            backend,
            grad_scale,
            found_inf,
            clip,
        )
    return loss


def init_group(optimizer: FusedAdam, group: dict[str, Any], *lists: list) -> GroupPlan | None:
    """Fill ``lists`` (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masters,
    exp_avg_absmaxes, exp_avg_sq_absmaxes) with the group's tensors, after checking them and creating missing
    state as the eager step does; returns the group's plan, None where no param has a grad. Called with
    torch.optim.Adam's six lists (its differentiable step), it is Adam's own ``_init_group``."""
    if len(lists) == 6:
        _record_backend(optimizer, group, "torch")
        return torch.optim.Adam._init_group(optimizer, group, *lists)
    from adam_gpu import optim  # (optim imports this module)

    if group is optimizer.param_groups[0]:  # every group checked before any state is created, as in the eager step
        for other in optimizer.param_groups[1:]:
            optimizer._plan(other)
    plan = optimizer._plan(group)
    _record_backend(optimizer, group, None if plan is None else plan.backend_name)
    if plan is None:
        return None
    fresh = [p for p in plan.params if not optimizer.state.get(p)]
    new_steps = iter(optim._zero_steps(len(fresh), group, plan.params[0].device))
    states = [optimizer._state_for(p, group, new_steps) for p in plan.params]
    if group["capturable"]:
        optim._device_step_counts(plan.params, states)
    tensors = optim._gather(group, plan.params, states).tensors
    masters, master_indices = custom_op.present(tensors.masters)
    exp_avg_absmaxes, quantized_indices = custom_op.present(tensors.exp_avg_absmaxes)
    exp_avg_sq_absmaxes = [tensors.exp_avg_sq_absmaxes[index] for index in quantized_indices]
    steps = [state["step"] for state in states]
    found = (*tensors.lists()[:5], steps, masters, exp_avg_absmaxes, exp_avg_sq_absmaxes)
    for target, values in zip(lists, found, strict=True):
        target.extend(values)
    hp = plan.hp
    return (
        plan.backend_name,
        master_indices,
        quantized_indices,
        bool(group["capturable"]),
        hp.beta1,
        hp.beta2,
        hp.eps,
        hp.weight_decay,
        hp.decoupled,
        hp.amsgrad,
        hp.maximize,
    )


def _record_backend(optimizer: FusedAdam, group: dict[str, Any], name: str | None) -> None:
    """Note in ``optimizer.selected_backends`` the backend that runs ``group``, while tracing: every run of the graph
    runs that one. (The graph itself cannot: dynamo drops an attribute set on an optimizer, and a list changed in
    place would be guarded on, recompiling at the next call.)"""
    groups = optimizer.param_groups
    names = list(optimizer.selected_backends)[: len(groups)]
    names += [None] * (len(groups) - len(names))
    names[next(index for index, candidate in enumerate(groups) if candidate is group)] = name
    optimizer.selected_backends = names
