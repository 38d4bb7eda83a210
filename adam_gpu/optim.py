"""``FusedAdam`` and ``FusedAdamW``: drop-in ``torch.optim.Adam``/``AdamW`` running adam-gpu's kernels.

Arguments, defaults and the ``state_dict`` layout are torch's (``step`` a float32 tensor on the CPU,
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so a state_dict moves between torch.optim and these
classes both ways. Extra arguments (``FusedAdam``'s docstring says each in full): ``backend`` (``"auto"`` or a
name in ``adam_gpu.BACKENDS``: ``"triton"``, ``"cupy"``, ``"torch"``), ``state_dtype`` (None, ``torch.float32``,
``torch.bfloat16``, ``"8bit"``), ``master_weights`` (False, True, ``"lean"``) and ``max_grad_norm``.
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, repeat
from operator import is_not
from types import ModuleType
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer
from torch.utils.weak import WeakTensorKeyDictionary

from adam_gpu import compiled_step, dispatch, masters, step_signature
from adam_gpu.device_inputs import DeviceInputs, device_values, is_capturing
from adam_gpu.functional import apply_step, shared_step_buffer
from adam_gpu.hyperparameters import AdamHyperparameters, check_hyperparameters, check_tensor_hyperparameters
from adam_gpu.sharded import any_dtensor, check_same_sharding, clip_coefficient, is_dtensor, local_tensors
from adam_gpu.state_layout import check_loadable, master_cast_away
from adam_gpu.step_signature import PreparedGroup
from adam_gpu.step_tensors import StepTensors, WrittenSpans, check_param, check_step_count, memory_span
from adam_gpu.storage_formats import (
    MASTER_KEYS,
    MASTERED_DTYPES,
    MOMENT_STATE_KEYS,
    NO_MASTER,
    PLAIN_KEYS,
    MomentFormat,
    has_moment,
    master_option,
    moment_features,
    moment_format,
    stored_moment,
    stored_scale,
)

# Group keys that torch.optim.Adam's state_dict may lack (older torch) or that only adam-gpu has.
_GROUP_OPTIONS = (
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
    "state_dtype",
    "master_weights",
)


# Group keys only adam-gpu has (FusedAdam.state_dict leaves them out where they hold the optimizer's defaults).
ADAM_GPU_GROUP_KEYS = ("state_dtype", "master_weights")


# torch.optim's wrapper of an optimizer's step in its hooks and profiler range (torch's own API; where a torch lacks it,
# torch's Optimizer wraps FusedAdam.step itself).
_profile_hook_step = getattr(Optimizer, "profile_hook_step", None)
_set_grad_enabled = getattr(torch._C, "_set_grad_enabled", torch.set_grad_enabled)


def _watched(optimizer: Optimizer) -> bool:
    """Whether a step hook is registered (on ``optimizer`` or globally) or torch's profiler is recording: the step
    then runs inside torch.optim's wrapper, which otherwise costs more than the rest of a one-tensor step."""
    return bool(
        optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or torch_optimizer._global_optimizer_pre_hooks
        or torch_optimizer._global_optimizer_post_hooks
        or torch.autograd._profiler_enabled()
    )


@dataclass
class _Gathered:
    """A group's tensors as the kernels take them, and its step counts."""

    tensors: StepTensors
    steps: list[torch.Tensor]


@dataclass
class _GroupPlan:
    """What one group's step will do, decided before anything is written."""

    group: dict[str, Any]
    params: list[torch.Tensor]
    hp: AdamHyperparameters
    backend_name: str
    backend: ModuleType
    reused: _Gathered | None = None  # the tensors of a step that matched the group's PreparedGroup
    written: WrittenSpans | None = None  # the memory a step that was checked in full writes (before new state)


class FusedAdam(Optimizer):
    """Adam with a fused single-pass kernel; ``decoupled_weight_decay=True`` makes it AdamW.

    Args follow ``torch.optim.Adam``. ``foreach`` and ``fused`` are accepted for drop-in use and
    ignored (the step is always fused). ``differentiable=True`` runs torch.optim.Adam's own differentiable step
    (autograd records the update: the slow path, for higher-order gradients), with torch's state layout.
    capturable: keep step counts on the params' device and read lr (a tensor, to change it after
        capture) and them there: ``step()`` never synchronizes and can be captured in a CUDA graph; with
        it, ``torch.amp.GradScaler`` hands its scale and found_inf to the kernels (no host check).
    backend: ``"auto"`` picks the best backend that can run each group's tensors (recorded in
        ``selected_backends`` after each step); a named backend that cannot run raises
        ``BackendUnavailableError`` with the reason.
    state_dtype: None keeps exp_avg/exp_avg_sq in the param dtype (torch's layout); ``torch.float32``
        keeps them in fp32 for fp16/bf16 params; ``torch.bfloat16`` halves the moments of fp32 params;
        ``"8bit"`` stores them block-wise quantized (adam_gpu.quantization: uint8 codes and an fp32 absmax
        per 256 elements, ``state["exp_avg_codes"]``, ``["exp_avg_absmax"]``, ...), quantized and
        dequantized inside the fused step; tensors under 4,096 elements keep fp32 moments.
    max_grad_norm: clip the global gradient norm (all groups) to this, as
        ``torch.nn.utils.clip_grad_norm_`` would, inside the update: grads are not rewritten.
    master_weights: for fp16/bf16 params, ``True`` keeps an fp32 master copy (``state["master_param"]``)
        updated in the same pass, the param written as its rounding; ``"lean"`` (bf16 only) keeps a 16-bit
        remainder (``state["master_remainder"]``) that with the bf16 param reconstructs the fp32 master
        exactly: 2 extra bytes a parameter instead of 4.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = dispatch.AUTO,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        master_weights: bool | str = False,
    ) -> None:
        check_tensor_hyperparameters(lr, betas, foreach, capturable)
        check_hyperparameters(lr, betas, eps, weight_decay)
        master_option(master_weights)
        dispatch.check_requested(backend)
        if max_grad_norm is not None and not float(max_grad_norm) > 0:
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        if differentiable:
            _check_differentiable(backend, state_dtype, master_weights, max_grad_norm)
        _check_state_dtype(state_dtype, amsgrad)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            state_dtype=state_dtype,
            master_weights=master_weights,
        )
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        # Name of the backend that ran each param group in the last step (None: no grads in it).
        self.selected_backends: list[str | None] = []
        self._prepared: dict[int, PreparedGroup] = {}  # by id(group)
        self._master_marks = WeakTensorKeyDictionary()  # adam_gpu.masters: each param's mark after its last step
        super().__init__(params, defaults)

    _init_group = compiled_step.init_group  # dynamo runs it while tracing (torch.compile); also Adam's, for its step

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; the backend choice goes too.
        return {
            **super().__getstate__(),
            "backend": self.backend,
            "selected_backends": self.selected_backends,
            "max_grad_norm": self.max_grad_norm,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by unpickling (state from __getstate__) and by load_state_dict (state and groups only:
        # the backend chosen for this optimizer stays).
        super().__setstate__(state)
        self._prepared = {}
        self._master_marks = WeakTensorKeyDictionary()
        self.__dict__.setdefault("backend", dispatch.AUTO)
        self.__dict__.setdefault("selected_backends", [])
        self.__dict__.setdefault("max_grad_norm", None)
        for group in self.param_groups:
            for key in _GROUP_OPTIONS:
                group.setdefault(key, self.defaults[key])

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler hands ``grad_scale`` and ``found_inf`` to ``step()`` instead of unscaling
        and checking on the host, when every group keeps its step counts on the device (capturable)."""
        return all(group["capturable"] for group in self.param_groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_tensor_hyperparameters(group["lr"], group["betas"], group["foreach"], group["capturable"])
            check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            _check_state_dtype(group["state_dtype"], group["amsgrad"])
            master_option(group["master_weights"])
            for index, param in enumerate(group["params"]):
                check_param(param, index)
            _check_master_params(group["master_weights"], group["params"])
            _check_no_duplicates(group["params"])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step for every param with a grad.

        All groups are checked, and their state created, before any is written: a bad input leaves
        every group untouched. Should a launch itself fail, the groups before it have taken their step
        and the failing group and those after it have not (params, moments and step counts untouched);
        the error says which group. Under torch.compile: adam_gpu.compiled_step."""
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return _traced_step(self, closure)
        # torch.optim's step hooks and profiler range, run as torch runs them, where any applies (_watched).
        if type(self).step is _fused_adam_step and _watched(self):
            return _step_with_hooks(self, closure)
        return self._step(closure)

    if _profile_hook_step is not None:  # (else torch wraps step in them at every call, as for its own optimizers)
        step.hooked = True  # type: ignore[attr-defined]

    def _step(self, closure: Callable[[], float] | None) -> float | None:
        grad_enabled = torch.is_grad_enabled()
        _set_grad_enabled(False)  # (cheaper than entering torch.no_grad())
        try:
            return self._step_without_grad(closure)
        finally:
            _set_grad_enabled(grad_enabled)

    def _step_without_grad(self, closure: Callable[[], float] | None) -> float | None:
        if self.defaults["differentiable"]:
            self.selected_backends = ["torch"] * len(self.param_groups)
            return _torch_differentiable_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._forget_removed_groups()
        plans = [self._plan(group) for group in self.param_groups]
        self._release_unstepped(plans)
        clip_coefficient = self._clip_coefficient([plan for plan in plans if plan is not None])
        launches = {index: self._prepare(plan, clip_coefficient) for index, plan in enumerate(plans) if plan}
        self.selected_backends = [plan.backend_name if plan else None for plan in plans]
        for index, launch in launches.items():
            try:
                launch()
            except Exception as error:
                if hasattr(error, "add_note"):  # Python >= 3.11
                    error.add_note(
                        f"adam-gpu: raised while stepping param group {index}; the groups before it took their "
                        "step, this group and those after it did not"
                    )
                raise
        return loss

    def _forget_removed_groups(self) -> None:
        """Drop what was kept for param groups no longer in ``param_groups``: a PreparedGroup holds its group (and so
        the group's params) and its tensor tables, which would otherwise stay in memory. (A kept group stays
        alive with its PreparedGroup, so no new group can have its id.)"""
        removed = self._prepared.keys() - {id(group) for group in self.param_groups}
        for key in removed:
            del self._prepared[key]

    def _release_unstepped(self, plans: list[_GroupPlan | None]) -> None:
        """A group no param of which has a grad keeps no state dicts in its record (PreparedGroup.states): state
        the user drops for a frozen group is freed at once."""
        for group, plan in zip(self.param_groups, plans, strict=True):
            prepared = self._prepared.get(id(group)) if plan is None else None
            if prepared is not None:
                prepared.states = None

    def _clip_coefficient(self, plans: list[_GroupPlan]) -> torch.Tensor | None:
        """``min(1, max_grad_norm / (norm + 1e-6))`` of all grads together, as torch.nn.utils.clip_grad_norm_
        computes it, on the device (grads scaled by AMP are measured unscaled); None without clipping."""
        if self.max_grad_norm is None or not plans:
            return None
        # DTensor grads (FSDP2) count with every rank's shard: the global norm, as clip_grad_norm_ gives.
        grads = [p.grad for plan in plans for p in plan.params]
        grad_scale = getattr(self, "grad_scale", None)
        return clip_coefficient(grads, self.max_grad_norm, grad_scale, plans[0].params[0].device)

    def _plan(self, group: dict[str, Any]) -> _GroupPlan | None:
        everyone = group["params"]
        grads = list(map(_grad, everyone))  # (each .grad read once a step)
        if all(map(is_not, grads, repeat(None))):
            params = list(everyone)
        else:
            params = [p for p, grad in zip(everyone, grads, strict=True) if grad is not None]
            grads = [grad for grad in grads if grad is not None]
        if not params:
            return None
        hp = _hyperparameters(group, self._prepared.get(id(group)))
        reused = self._reusable(group, params, grads)
        capturing = is_capturing(params[0].device)
        if reused is not None:  # (its options, so its state dtype and master mode, are those of a full check)
            if capturing:
                _check_capturable(group, params, self.state)
            prepared = self._prepared[id(group)]
            key = (self.backend, os.environ.get(dispatch.BACKEND_ENV_VAR))
            if prepared.resolved is None or prepared.resolved[0] != key:
                converted = _converted_state(group, params)
                resolved = dispatch.resolve(
                    self.backend, params[0].device, prepared.dtypes, prepared.features, converted
                )
                prepared.resolved = (key, resolved)
            name, backend = prepared.resolved[1]
            return _GroupPlan(group, params, hp, name, backend, reused)
        fmt = _check_state_dtype(group["state_dtype"], group["amsgrad"])
        master_option(group["master_weights"])
        written = self._check_tensors(group, params)
        if capturing:
            _check_capturable(group, params, self.state)
        if fmt.scale is not None and any(is_dtensor(p) for p in params):
            # The scales' blocks would follow each rank's shard, which a DTensor state cannot describe.
            raise TypeError(
                f"state_dtype={fmt.option!r} is not supported for DTensor params (FSDP2): use None or torch.float32"
            )
        features = _features(group, params)
        dtypes, converted = {p.dtype for p in params}, _converted_state(group, params)
        name, backend = dispatch.resolve(self.backend, params[0].device, dtypes, features, converted)
        return _GroupPlan(group, params, hp, name, backend, None, written)

    def _check_tensors(self, group: dict[str, Any], params: list[torch.Tensor]) -> WrittenSpans:
        """Every check of the group's params, grads and state, naming the first bad tensor: what the step will
        read and write (the state it creates aside) is checked as the kernels will be given it."""
        _check_master_params(group["master_weights"], params)
        states = [self.state.get(param) or {} for param in params]
        if any_dtensor(chain(params, map(_grad, params))):  # (first: the kernels see local shards, sharded alike)
            for index, (param, state) in enumerate(zip(params, states, strict=True)):
                check_same_sharding(param, param.grad, "grad", index)
                for key in PLAIN_KEYS:
                    if key in state:
                        check_same_sharding(param, state[key], key, index)
        gathered = _gather(group, params, [_complete(state, index) for index, state in enumerate(states)])
        # (Where a param has no state yet, its moments are created at its shape: None stands for them here.)
        tensors = StepTensors(*(local_tensors(tensors) for tensors in gathered.tensors.lists()))
        written = tensors.check(bool(group["amsgrad"]))
        for index, step in enumerate(gathered.steps):
            if step is not None:
                check_step_count(step, f"the step count of param {index}")
        return written

    def _reusable(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> _Gathered | None:
        """The group's tensors when its last full check still holds for them (step_signature.reused); None
        otherwise: the full checks then say what is wrong, if anything."""
        prepared = self._prepared.get(id(group))
        if prepared is None or prepared.group is not group or prepared.options != _layout_options(group):
            return None
        found = step_signature.reused(prepared, params, grads, self.state, _gather_lists)
        return None if found is None else _Gathered(*found)

    def _prepare(self, plan: _GroupPlan, clip_coefficient: torch.Tensor | None) -> Callable[[], None]:
        """Create the group's missing state and gather its tensors; returns the launch, which writes."""
        gathered = plan.reused
        if gathered is None:
            gathered = self._gather_anew(plan)
        prepared = self._prepared.get(id(plan.group))
        tensors = gathered.tensors
        if prepared is not None:
            tensors.memo = prepared.memo
        device_inputs = self._device_inputs(plan, gathered.steps, clip_coefficient)
        buffer = prepared.step_buffer if prepared is not None else None
        step = functools.partial(apply_step, plan.backend, tensors, gathered.steps, plan.hp, device_inputs, buffer)
        if not plan.group["master_weights"]:
            return step
        # The user's writes to a param since the last step are kept: its master is re-seeded (adam_gpu.masters).
        keys, marks = plan.params, self._master_marks
        masters.reseed_stale(keys, tensors.params, tensors.masters, marks)

        def step_and_mark() -> None:
            step()
            masters.record(keys, tensors.params, tensors.masters, marks)

        return step_and_mark

    def _gather_anew(self, plan: _GroupPlan) -> _Gathered:
        """The group's tensors after creating its missing state; remembered (a PreparedGroup) for the next steps.
        Grads that lie in memory the step writes are read from copies (StepTensors.copy_grads)."""
        fresh = [p for p in plan.params if not self.state.get(p)]
        new_steps = iter(_zero_steps(len(fresh), plan.group, plan.params[0].device))
        states = [self._state_for(p, plan.group, new_steps) for p in plan.params]
        if plan.group["capturable"]:
            _device_step_counts(plan.params, states)
        gathered = _gather(plan.group, plan.params, states)
        signature = step_signature.signature(gathered.tensors, gathered.steps, states)
        # The kernels get plain tensors: a DTensor's local shard, which shares its storage (adam_gpu.sharded).
        tensors = StepTensors(*(local_tensors(tensors) for tensors in gathered.tensors.lists()))
        named = tensors.written()
        written = plan.written
        if written is None or len(named) != written.count:  # (state was created: its memory is written too)
            written = WrittenSpans.of(sorted(memory_span(t) for _, t in named if t.numel()), len(named))
        self._prepared.pop(id(plan.group), None)
        if signature is not None:
            options = _layout_options(plan.group)
            buffer = shared_step_buffer(gathered.steps)
            features = frozenset(_features(plan.group, plan.params))
            record = PreparedGroup.of(plan.group, options, signature, tensors, buffer, written, features)
            self._prepared[id(plan.group)] = record.with_states(self.state, states)
        tensors.copy_grads(written.aliased_grads(tensors.grads))
        gathered.tensors = tensors
        return gathered

    def _device_inputs(
        self, plan: _GroupPlan, steps: list[torch.Tensor], clip_coefficient: torch.Tensor | None
    ) -> DeviceInputs | None:
        """What the step reads from the device: in capturable mode lr and the step counts; with AMP
        (GradScaler's grad_scale and found_inf, set on the optimizer around ``step()``) and with fused
        clipping, the grad multiplier and found_inf. None when everything comes from the host."""
        capturable = plan.group["capturable"]
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        grad_scaling = grad_scale is not None or found_inf is not None or clip_coefficient is not None
        if not (capturable or grad_scaling):
            return None
        device = plan.params[0].device
        values = device_values(plan.group["lr"], device, grad_scale, found_inf, clip_coefficient)
        return DeviceInputs(values, steps if capturable else None, grad_scaling)

    def _state_for(
        self, param: torch.Tensor, group: dict[str, Any], new_steps: Iterator[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The param's state, created on first use exactly as torch.optim.Adam lays it out (its step count
        the next of ``new_steps``)."""
        state = self.state[param]
        mode = master_option(group["master_weights"])
        master_key = mode.key if mode.holds(param.dtype) else None
        has_max = not group["amsgrad"] or "max_exp_avg_sq" in state
        if state and has_max and (master_key is None or master_key in state):
            return state  # every step but the first: nothing to create (this runs for every param of every step)
        fmt = moment_format(group["state_dtype"])
        if not state:
            state["step"] = next(new_steps)
            state.update(fmt.new_moments(param))
        if master_key is not None and master_key not in state:
            state[master_key] = mode.create(param)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = fmt.new_plain(param)
        return state

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, less the group keys only adam-gpu has (``state_dtype``, ``master_weights``) where
        a group holds this optimizer's default: with the defaults torch has (None, False) it is then key for key
        torch.optim.AdamW's, which a ``torch.distributed.checkpoint`` load needs in both directions (its planner
        refuses a key the checkpoint lacks). A group loaded without them takes this optimizer's defaults."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            for key in ADAM_GPU_GROUP_KEYS:
                if key in group and group[key] == self.defaults[key]:
                    del group[key]
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, then repairs: fp32 moments (``state_dtype=torch.float32``) and master weights
        are taken from the saved values rather than from torch's cast to the param dtype, and ``step`` is kept
        on the host (a state_dict of torch's fused AdamW holds it on the GPU), or on the device for a
        capturable group. A state_dict that does not fit (other group sizes, a missing or misshapen
        moment) raises before anything is loaded."""
        check_loadable(state_dict, self.param_groups)
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for saved_id, group, param in zip(saved_ids, *_groups_and_params(self.param_groups), strict=True):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[param]
            step = state["step"]
            if not isinstance(step, torch.Tensor):  # (a number: torch before 1.12 saved it so, torch.optim takes it)
                step = torch.tensor(float(step))
            if group["capturable"]:
                state["step"] = step.detach().to(param.device, torch.float32)
            else:
                state["step"] = step.detach().to("cpu", _scalar_dtype())
            dtype = moment_format(group["state_dtype"]).plain_dtype
            if dtype is not None:  # (torch cast them to the param's dtype; a scaled format's small tensors: fp32)
                for key in PLAIN_KEYS:
                    if key in saved:
                        state[key] = saved[key].to(param.device, dtype, copy=True)
            # torch cast the masters and scaled moments to the param dtype too: restore them as saved. A master that
            # a torch.optim detour cast to the param's dtype is dropped (re-created from the param at the next
            # step), as is one that no longer rounds to its param then (adam_gpu.masters).
            for key in [*MASTER_KEYS, *(k for k in MOMENT_STATE_KEYS if k not in PLAIN_KEYS)]:
                if key in saved and master_cast_away(saved[key]) and key in MASTER_KEYS:
                    state.pop(key, None)
                elif key in saved:
                    state[key] = saved[key].to(param.device, copy=True)


_fused_adam_step = FusedAdam.step
_step_with_hooks = _profile_hook_step(FusedAdam._step) if _profile_hook_step is not None else FusedAdam._step
# What dynamo traces (torch's wrapper included, as for torch's own optimizers: hooks run, the profiler sees it).
_traced_step = (
    _profile_hook_step(compiled_step.traced_step) if _profile_hook_step is not None else compiled_step.traced_step
)


class FusedAdamW(FusedAdam):
    """AdamW (decoupled weight decay, default 1e-2) with a fused single-pass kernel. See FusedAdam."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        # As torch.optim.AdamW: whatever state is loaded (an Adam state_dict, say), its weight decay is decoupled.
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = dispatch.AUTO,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        master_weights: bool | str = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            backend=backend,
            state_dtype=state_dtype,
            max_grad_norm=max_grad_norm,
            master_weights=master_weights,
        )


# differentiable=True: torch.optim.Adam's step over this optimizer's groups and state (torch's layout), which
# records the update in autograd; it gathers with Adam's _init_group.
_torch_differentiable_step = torch.optim.Adam.step


def _check_differentiable(backend: str, state_dtype: object, master_weights: object, max_grad_norm: object) -> None:
    """differentiable=True runs torch's differentiable Adam, which has none of adam-gpu's own options."""
    if backend not in (dispatch.AUTO, "torch"):
        raise ValueError(
            f"differentiable=True runs torch.optim's differentiable Adam: use backend 'auto', not {backend!r}"
        )
    if state_dtype is not None or master_weights or max_grad_norm is not None:
        raise ValueError(
            "differentiable=True runs torch.optim's differentiable Adam: state_dtype, master_weights and "
            "max_grad_norm are not available with it"
        )


def _check_no_duplicates(params: list[torch.Tensor]) -> None:
    """A param listed twice in a group is refused (torch.optim warns, steps it twice with one grad, and says this
    will become an error; the kernels would write it from two places in one launch)."""
    first: dict[int, int] = {}
    for index, param in enumerate(params):
        earlier = first.setdefault(id(param), index)
        if earlier != index:
            raise ValueError(
                f"param {index} of the param group is param {earlier} again: a param group cannot have duplicate "
                "parameters (torch.optim warns and steps it twice; adam-gpu refuses, on every backend)"
            )


def _check_master_params(master_weights: object, params: Iterable[torch.Tensor]) -> None:
    """A 16-bit param the group's master mode cannot hold is refused (fp32 params are their own masters)."""
    mode = master_option(master_weights)
    if mode is NO_MASTER:
        return
    for index, param in enumerate(params):
        if param.dtype in MASTERED_DTYPES and not mode.holds(param.dtype):
            name = str(param.dtype).removeprefix("torch.")
            raise TypeError(f"param {index} is {name}: master_weights={mode.option!r} {mode.refusal}")


def _check_capturable(group: dict[str, Any], params: list[torch.Tensor], state: dict) -> None:
    """A step captured in a CUDA graph must read everything that changes from the device, and must not create
    state (a graph would zero the new moments again at every replay), as torch.optim's capturable optimizers
    require; raised before anything is written."""
    where = "adam-gpu: step() is being captured in a CUDA graph"
    if not group["capturable"]:
        raise RuntimeError(
            f"{where}, but the param group has capturable=False: its step counts and bias corrections live on "
            "the host and would be frozen into the graph. Construct the optimizer with capturable=True."
        )
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.device != params[0].device:
        raise RuntimeError(
            f"{where}, but lr is a tensor on {lr.device}: the graph would keep its value at capture. Put it on "
            f"{params[0].device} (changed in place by a scheduler, each replay reads it), or pass a float."
        )
    for index, param in enumerate(params):
        if not state.get(param):
            raise RuntimeError(
                f"{where} before param {index} has any state: the graph would create (zero) its moments again at "
                "every replay. Take a step before capturing (a warm-up on a side stream), as torch.optim needs."
            )
        step = state[param]["step"]
        if step.dtype != torch.float32 or step.device != param.device:
            raise RuntimeError(
                f"{where}, but the step count of param {index} is {step.dtype} on {step.device}: the step reads "
                f"float32 counts on {param.device}, and converting it would be frozen into the graph. Take an eager "
                "step first (it converts the count)."
            )


def _check_state_dtype(state_dtype: object, amsgrad: bool = False) -> MomentFormat:
    """The moment format ``state_dtype`` asks for, if it can be had (with ``amsgrad``)."""
    fmt = moment_format(state_dtype)
    if amsgrad and not fmt.amsgrad:
        raise ValueError(f"amsgrad with {fmt.name} moments is not supported: use state_dtype=None or torch.float32")
    return fmt


def _device_step_counts(params: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
    """A capturable step reads each step count on the device as float32 (torch's capturable layout): one put in
    the state as another dtype or elsewhere (an integer count, a float64 or float16 one, one on the host) is
    converted, its value kept."""
    for param, state in zip(params, states, strict=True):
        step = state["step"]
        if step.dtype != torch.float32 or step.device != param.device or step.dim() != 0:
            state["step"] = step.detach().reshape(()).to(param.device, torch.float32)


def _zero_steps(count: int, group: dict[str, Any], device: torch.device) -> list[torch.Tensor]:
    """``count`` new step counts, views of one tensor, which a step reads and increments in one op each
    (functional.shared_step_buffer): float32 on the device in a capturable group (torch's capturable layout), else
    on the host."""
    on_device = {"dtype": torch.float32, "device": device} if group["capturable"] else {"dtype": _scalar_dtype()}
    return list(torch.zeros(count, **on_device).unbind())


_grad = operator.attrgetter("grad")


def _gather(group: dict[str, Any], params: list[torch.Tensor], states: list[dict[str, torch.Tensor]]) -> _Gathered:
    """The tensors of ``params`` and their ``states`` for the kernels (DTensors as they are; None for an entry a
    state lacks). A master is read under the key of the group's ``master_weights`` only: one left from another
    mode is not the group's."""
    mode = master_option(group["master_weights"])
    tensors = StepTensors(
        params=params,
        grads=[p.grad for p in params],
        exp_avgs=[stored_moment(s, 0) for s in states],
        exp_avg_sqs=[stored_moment(s, 1) for s in states],
        exp_avg_absmaxes=[stored_scale(s, 0) for s in states],
        exp_avg_sq_absmaxes=[stored_scale(s, 1) for s in states],
        max_exp_avg_sqs=[s.get("max_exp_avg_sq") for s in states] if group["amsgrad"] else [],
        masters=[s.get(mode.key) if mode.holds(p.dtype) else None for p, s in zip(params, states, strict=True)],
    )
    return _Gathered(tensors, [s.get("step") for s in states])


def _complete(state: dict[str, Any], index: int) -> dict[str, Any]:
    """``state``, unless it is neither empty (a param's first step creates it) nor holds what every step reads."""
    if state:
        if "step" not in state:
            raise ValueError(f"the optimizer state of param {index} has no 'step' (it has {sorted(state)})")
        for moment, key in enumerate(PLAIN_KEYS[:2]):
            if not has_moment(state, moment):
                raise ValueError(f"the optimizer state of param {index} has no {key!r} (it has {sorted(state)})")
    return state


def _gather_lists(
    group: dict[str, Any], params: list[torch.Tensor], states: list[dict[str, Any]]
) -> tuple[StepTensors, list[torch.Tensor]]:
    """_gather's tensors and step counts (step_signature.reused gathers with it)."""
    gathered = _gather(group, params, states)
    return gathered.tensors, gathered.steps


def _features(group: dict[str, Any], params: list[torch.Tensor]) -> set[str]:
    """What the group's moment format asks of a backend (8-bit moments: where a tensor is large enough to have
    them; smaller ones keep fp32 moments)."""
    fmt = moment_format(group["state_dtype"])
    return moment_features([fmt]) if any(map(fmt.scaled, params)) else set()


def _converted_state(group: dict[str, Any], params: list[torch.Tensor]) -> bool:
    """Whether the group's step keeps some param's master or moments in another dtype than the param, as
    StepTensors.converted_state tells of the tensors (8-bit groups: the fp32 moments of tensors too small to
    quantize)."""
    master = master_option(group["master_weights"])
    if any(master.holds(p.dtype) for p in params):
        return True
    state_dtype = moment_format(group["state_dtype"]).plain_dtype
    return state_dtype is not None and any(p.dtype != state_dtype for p in params)


_HYPERPARAMETER_KEYS = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad", "maximize")


def _hyperparameters(group: dict[str, Any], prepared: PreparedGroup | None) -> AdamHyperparameters:
    """The group's AdamHyperparameters: those ``prepared`` keeps from its last step where the group's values are
    the same plain numbers (then checked already)."""
    values = tuple(map(group.__getitem__, _HYPERPARAMETER_KEYS))
    last = prepared.hyperparameters if prepared is not None else None
    if last is not None and _same_numbers(last[0], values):
        return last[1]
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    # A capturable group's lr tensor is read on the device; float() here would wait for it.
    on_device_lr = group["capturable"] and isinstance(lr, torch.Tensor)
    hp = AdamHyperparameters(
        lr=0.0 if on_device_lr else float(lr),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(group["eps"]),
        weight_decay=float(group["weight_decay"]),
        decoupled=bool(group["decoupled_weight_decay"]),
        amsgrad=bool(group["amsgrad"]),
        maximize=bool(group["maximize"]),
    )
    if prepared is not None and all(type(value) in _PLAIN for value in (*values, *group["betas"])):
        prepared.hyperparameters = (values, hp)  # (not a tensor's: its value may change in place)
    return hp


_PLAIN = {float, int, bool, tuple}


def _same_numbers(last: tuple, values: tuple) -> bool:
    """Whether ``values`` are ``last`` (plain numbers and tuples of them), type for type."""
    return last == values and list(map(type, last)) == list(map(type, values))


def _layout_options(group: dict[str, Any]) -> tuple:
    """The group options that decide which state tensors a step creates and gathers."""
    return group["amsgrad"], group["state_dtype"], group["master_weights"], group["capturable"]


def _scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for ``step``: float32, or float64 when that is the default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _groups_and_params(groups: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    pairs = [(group, param) for group in groups for param in group["params"]]
    return [g for g, _ in pairs], [p for _, p in pairs]
