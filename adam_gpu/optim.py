"""``FusedAdam`` and ``FusedAdamW``: drop-in ``torch.optim.Adam``/``AdamW`` running adam-gpu's kernels.

Arguments, defaults and the ``state_dict`` layout are torch's (``step`` a float32 tensor on the CPU,
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so a state_dict moves between torch.optim and these
classes both ways. Extra arguments: ``backend`` (``"auto"``, ``"triton"``, ``"torch"``) and
``state_dtype`` (None: moments in the param dtype, as torch; ``torch.float32``: fp32 moments).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from types import ModuleType
from typing import Any

import torch
from torch.optim import Optimizer

from adam_gpu import dispatch
from adam_gpu.functional import apply_step
from adam_gpu.hyperparameters import AdamHyperparameters, check_hyperparameters
from adam_gpu.step_tensors import StepTensors, check_grad, check_moment, check_one_device, check_param

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
STATE_DTYPES = (None, torch.float32)
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
)


@dataclass
class _GroupPlan:
    """What one group's step will do, decided before anything is written."""

    group: dict[str, Any]
    params: list[torch.Tensor]
    hp: AdamHyperparameters
    backend_name: str
    backend: ModuleType


class FusedAdam(Optimizer):
    """Adam with a fused single-pass kernel; ``decoupled_weight_decay=True`` makes it AdamW.

    Args follow ``torch.optim.Adam``. ``foreach`` and ``fused`` are accepted for drop-in use and
    ignored (the step is always fused); ``capturable`` and ``differentiable`` are not supported.
    backend: ``"auto"`` picks the best backend that can run each group's tensors (recorded in
        ``selected_backends`` after each step); a named backend that cannot run raises
        ``BackendUnavailableError`` with the reason.
    state_dtype: None keeps exp_avg/exp_avg_sq in the param dtype (torch's layout); ``torch.float32``
        keeps them in fp32 for fp16/bf16 params.
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
    ) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        dispatch.check_backend_name(backend)
        if capturable:
            raise ValueError("capturable=True is not supported yet: lr and the step count are kept on the host")
        if differentiable:
            raise ValueError("differentiable=True is not supported: the fused kernels record no autograd history")
        _check_state_dtype(state_dtype)
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
        )
        self.backend = backend
        # Name of the backend that ran each param group in the last step (None: no grads in it).
        self.selected_backends: list[str | None] = []
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; the backend choice goes too.
        return {**super().__getstate__(), "backend": self.backend, "selected_backends": self.selected_backends}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by unpickling (state from __getstate__) and by load_state_dict (state and groups only:
        # the backend chosen for this optimizer stays).
        super().__setstate__(state)
        self.__dict__.setdefault("backend", dispatch.AUTO)
        self.__dict__.setdefault("selected_backends", [])
        for group in self.param_groups:
            for key in _GROUP_OPTIONS:
                group.setdefault(key, self.defaults[key])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            _check_state_dtype(group["state_dtype"])
            for index, param in enumerate(group["params"]):
                check_param(param, index)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step for every param with a grad. All groups are checked before any is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(group) for group in self.param_groups]
        self.selected_backends = [plan.backend_name if plan else None for plan in plans]
        for plan in plans:
            if plan is not None:
                self._run(plan)
        return loss

    def _plan(self, group: dict[str, Any]) -> _GroupPlan | None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        beta1, beta2 = group["betas"]
        hp = AdamHyperparameters(
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled=bool(group["decoupled_weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
        )
        _check_state_dtype(group["state_dtype"])
        tensors = [*params]
        for index, param in enumerate(params):
            check_param(param, index)
            check_grad(param, param.grad, index)
            tensors.append(param.grad)
            state = self.state.get(param, {})
            for key in MOMENT_KEYS:
                if key in state:
                    check_moment(param, state[key], index)
                    tensors.append(state[key])
        check_one_device(tensors)
        name, backend = dispatch.resolve(self.backend, params[0].device, {p.dtype for p in params})
        return _GroupPlan(group, params, hp, name, backend)

    def _run(self, plan: _GroupPlan) -> None:
        states = [self._state_for(p, plan.group) for p in plan.params]
        tensors = StepTensors(
            params=plan.params,
            grads=[p.grad for p in plan.params],
            exp_avgs=[s["exp_avg"] for s in states],
            exp_avg_sqs=[s["exp_avg_sq"] for s in states],
            max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if plan.hp.amsgrad else [],
        )
        apply_step(plan.backend, tensors, [s["step"] for s in states], plan.hp)

    def _state_for(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The param's state, created on first use exactly as torch.optim.Adam lays it out."""
        state = self.state[param]
        moment_dtype = group["state_dtype"] or param.dtype

        def zeros() -> torch.Tensor:
            return torch.zeros_like(param, dtype=moment_dtype, memory_format=torch.preserve_format)

        if not state:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state["exp_avg"] = zeros()
            state["exp_avg_sq"] = zeros()
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = zeros()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, then two repairs: fp32 moments (``state_dtype=torch.float32``) are taken
        from the saved values rather than from torch's cast to the param dtype, and ``step`` is kept
        on the host (a state_dict of torch's fused AdamW holds it on the GPU)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for saved_id, group, param in zip(saved_ids, *_groups_and_params(self.param_groups), strict=True):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[param]
            state["step"] = state["step"].detach().to("cpu", _scalar_dtype())
            if group["state_dtype"] is not None:
                for key in MOMENT_KEYS:
                    if key in saved:
                        state[key] = saved[key].to(param.device, group["state_dtype"], copy=True)


class FusedAdamW(FusedAdam):
    """AdamW (decoupled weight decay, default 1e-2) with a fused single-pass kernel. See FusedAdam."""

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
        )


def _check_state_dtype(state_dtype: object) -> None:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be None (the param dtype) or torch.float32, got {state_dtype!r}")


def _scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for ``step``: float32, or float64 when that is the default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _groups_and_params(groups: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    pairs = [(group, param) for group in groups for param in group["params"]]
    return [g for g, _ in pairs], [p for _, p in pairs]
