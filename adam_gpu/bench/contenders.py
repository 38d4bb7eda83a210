"""Who steps the benchmark's params: every adam-gpu backend, torch.optim's three implementations, and
the known fused and 8-bit optimizers from other packages whenever they are importable."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adam_gpu import dispatch
from adam_gpu.bench.cases import Policy
from adam_gpu.optim import FusedAdamW
from adam_gpu.storage_formats import EIGHT_BIT_MOMENTS, moment_features, moment_format

# The optimizers take the benchmark's hyper-parameters; weight decay makes every one do AdamW's full work.
HYPERPARAMETERS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
TORCH_KEEPS_PARAM_DTYPE = "torch.optim keeps moments in the param dtype"

Factory = Callable[[list[torch.Tensor], Policy, bool], torch.optim.Optimizer]


@dataclass(frozen=True)
class Contender:
    name: str
    family: str  # "adam-gpu", "torch", or the package it comes from
    make: Factory  # (params, policy, capturable) -> optimizer
    requires: str | None = None  # a package that must be importable
    devices: tuple[str, ...] = ("cuda", "cpu")
    moment_dtypes: bool = False  # can keep moments in another dtype than the params
    graphable: bool = True  # its step() can be captured in a CUDA graph
    eight_bit: bool = False  # always keeps 8-bit moments: measured on the 8-bit policy only

    def unavailable(self, device: torch.device, policy: Policy) -> tuple[str, str] | None:
        """None, or (status, reason) for a record that says why this contender was not measured."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return "not installed", f"{self.requires} is not importable"
        if device.type not in self.devices:
            return "unsupported", f"runs on {', '.join(self.devices)}, not {device.type}"
        if self.eight_bit:
            if moment_format(policy.state_dtype) is not EIGHT_BIT_MOMENTS:
                return "unsupported", "keeps 8-bit moments: measured on the 8-bit policy only"
        elif policy.state_dtype is not None and policy.state_dtype != policy.param_dtype and not self.moment_dtypes:
            return "unsupported", TORCH_KEEPS_PARAM_DTYPE if self.family == "torch" else "no moment dtype option"
        if policy.master_weights and self.family != "adam-gpu":
            return "unsupported", "no master weights option measured for it"
        return None


def _torch(**implementation: bool) -> Factory:
    def make(params: list[torch.Tensor], policy: Policy, capturable: bool) -> torch.optim.Optimizer:
        graph = {"capturable": True} if capturable and params[0].is_cuda else {}
        return torch.optim.AdamW(params, **HYPERPARAMETERS, **implementation, **graph)

    return make


def _adam_gpu(backend: str) -> Factory:
    def make(params: list[torch.Tensor], policy: Policy, capturable: bool) -> torch.optim.Optimizer:
        return FusedAdamW(
            params,
            **HYPERPARAMETERS,
            backend=backend,
            state_dtype=policy.state_dtype,
            master_weights=policy.master_weights,
            capturable=capturable,
        )

    return make


def _external(module: str, attribute: str, **options: object) -> Factory:
    def make(params: list[torch.Tensor], policy: Policy, capturable: bool) -> torch.optim.Optimizer:
        optimizer_class = getattr(importlib.import_module(module), attribute)
        return optimizer_class(params, **HYPERPARAMETERS, **options)

    return make


def _transformer_engine(params: list[torch.Tensor], policy: Policy, capturable: bool) -> torch.optim.Optimizer:
    from transformer_engine.pytorch.optimizers import FusedAdam

    moments = {"exp_avg_dtype": policy.moment_dtype, "exp_avg_sq_dtype": policy.moment_dtype}
    return FusedAdam(params, **HYPERPARAMETERS, adam_w_mode=True, **moments)


def contenders() -> list[Contender]:
    """Baselines first (torch fused is the reference of every speed-up), then adam-gpu's backends."""
    baselines = [
        Contender("torch for-loop", "torch", _torch(foreach=False)),
        Contender("torch foreach", "torch", _torch(foreach=True)),
        Contender("torch fused", "torch", _torch(fused=True)),
        Contender(
            "apex FusedAdam", "apex", _external("apex.optimizers", "FusedAdam", adam_w_mode=True),
            requires="apex", devices=("cuda",), graphable=False,
        ),
        Contender(
            "Transformer Engine FusedAdam", "transformer_engine", _transformer_engine,
            requires="transformer_engine", devices=("cuda",), moment_dtypes=True, graphable=False,
        ),
        Contender(
            "bitsandbytes AdamW8bit", "bitsandbytes", _external("bitsandbytes.optim", "AdamW8bit"),
            requires="bitsandbytes", devices=("cuda",), graphable=False, eight_bit=True,
        ),
        Contender(
            "torchao AdamW8bit", "torchao", _external("torchao.optim", "AdamW8bit"),
            requires="torchao", devices=("cuda",), graphable=False, eight_bit=True,
        ),
    ]  # fmt: skip
    ours = [
        Contender(f"adam-gpu {name}", "adam-gpu", _adam_gpu(name), requires=backend.requires, moment_dtypes=True)
        for name, backend in dispatch.BACKENDS.items()
        if backend.module.startswith("adam_gpu.")
    ]
    return baselines + ours


def adam_gpu_unavailable(contender: Contender, device: torch.device, policy: Policy) -> tuple[str, str] | None:
    """Why an adam-gpu backend cannot run here (the dispatcher's own reason), or None."""
    if contender.family != "adam-gpu":
        return None
    backend = contender.name.removeprefix("adam-gpu ")
    features = moment_features([moment_format(policy.state_dtype)])
    reason = dispatch.unavailable_reason(backend, device, [policy.param_dtype], features)
    return None if reason is None else ("unsupported", reason)
