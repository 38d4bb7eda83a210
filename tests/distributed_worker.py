"""One rank of tests/test_distributed.py, run as a subprocess: ``python distributed_worker.py RANK WORLD STORE OUT
BACKENDS``.

For each case (a wrapper: DDP, FSDP2's fully_shard, ZeroRedundancyOptimizer) it trains a small MLP for STEPS
steps on random data (different on every rank) twice, the wrapper driving torch.optim.AdamW and then
FusedAdamW on each backend, and saves (torch.save, OUT/rank{RANK}.pt) the full params, the optimizer
state_dict and what the test checks; the test process compares them. Then, per backend, the functional step
and master weights on DTensors and the errors for bad DTensor inputs. The first error stops the rank (a rank
that went on alone would wait in a collective for the other), and is saved with its traceback.
"""

from __future__ import annotations

import sys
import traceback
import zlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import support  # noqa: F401  (registers the cuda-host backend in adam_gpu.dispatch)
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from adam_gpu import FusedAdamW, fused_adam

STEPS = 6
BATCH = 8
IN, HIDDEN, OUT = 13, 37, 1  # odd sizes: uneven shards; the last layer's weight (1 x 37) and bias (1) leave
# rank 1 an empty local shard under fully_shard
COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a rank that waits longer fails instead of hanging the test
MAX_GRAD_NORM = 0.5

FULLY_SHARDED = ("fsdp", "fsdp-handover")  # wrappers that shard every layer with fully_shard
# fsdp-handover: the optimizer's state moves through distributed checkpointing's optimizer state dict to
# torch.optim.AdamW before this step and back to FusedAdamW before the next; before the steps in
# HANDOVER_THROUGH_FILES it goes through dcp.save and dcp.load (the default planner), else in memory.
HANDOVER_STEPS = (2, 3, 4, 5)
HANDOVER_THROUGH_FILES = (2, 3)
CHECKPOINTS: list[Path] = []  # the folder both ranks write distributed checkpoints in (set by main)
# Case -> (wrapper, AdamW options). Between them: amsgrad, maximize, weight decay, fused clipping, two param
# groups (one whose local shards are all empty on rank 1), DTensor and plain params in one group, and a
# handover through distributed checkpointing.
CASES: dict[str, tuple[str, dict]] = {
    "ddp": ("ddp", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)),
    "fsdp": ("fsdp", dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
    "fsdp-clip": ("fsdp", dict(lr=1e-2, weight_decay=0.01, max_grad_norm=MAX_GRAD_NORM)),
    "fsdp-handover": ("fsdp-handover", dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
    "fsdp-mixed": ("fsdp-first-layer", dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    "fsdp-mixed-clip": ("fsdp-first-layer", dict(lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM)),
    "zero": ("zero", dict(lr=1e-2, betas=(0.85, 0.995), weight_decay=0.1, maximize=True)),
}


def model() -> torch.nn.Sequential:
    """The same initial MLP on every rank and in every run (tanh: no dead units, every grad element moves)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy of the whole tensor (a DTensor gathered from all ranks)."""
    if isinstance(tensor, DTensor) and tensor.dtype == torch.int16:  # gloo has no int16 collectives
        tensor = tensor.to(torch.int32).full_tensor().to(torch.int16)
    tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return tensor.detach().clone()


def state_summary(state_dict: dict | None) -> dict | None:
    """Per param index and key: the state tensor's class, global shape and full value (None: not this rank)."""
    if state_dict is None:
        return None
    return {
        index: {key: (type(value).__name__, tuple(value.shape), full(value)) for key, value in state.items()}
        for index, state in state_dict["state"].items()
    }


def param_groups(net: torch.nn.Sequential, options: dict, wrapper: str) -> list[dict]:
    """Two groups, the last layer's with its own lr: on rank 1 under fully_shard its local shards are all empty.
    With only the first layer sharded, one group that holds DTensor and plain params together."""
    if wrapper == "fsdp-first-layer":
        return [{"params": list(net.parameters())}]
    return [
        {"params": list(net[0].parameters())},
        {"params": list(net[2].parameters()), "lr": options["lr"] / 3},
    ]


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_, or for DTensor and plain grads together, which it refuses, the same
    steps by hand: each grad's norm (a DTensor's over all its shards), their norm, and every grad multiplied
    by min(1, max_norm / (norm + 1e-6)). Returns the norm."""
    if len({isinstance(p, DTensor) for p in params}) == 1:
        return float(full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    total = torch.linalg.vector_norm(torch.stack([full(torch.linalg.vector_norm(p.grad)) for p in params]))
    coefficient = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # fp32, exact as a float
    for param in params:
        param.grad.mul_(coefficient)
    return float(total)


def train(wrapper: str, options: dict, backend: str | None, rank: int, case: str) -> dict:
    """STEPS steps of ``wrapper`` driving FusedAdamW on ``backend``, or torch.optim.AdamW when None."""
    net = model()
    initial = [full(p) for p in net.parameters()]
    options = dict(options)
    max_grad_norm = options.pop("max_grad_norm", None)

    def optimizer_on(backend: str | None) -> torch.optim.Optimizer:
        if backend is None:
            return torch.optim.AdamW(param_groups(net, options, wrapper), foreach=False, **options)
        return FusedAdamW(param_groups(net, options, wrapper), backend=backend, max_grad_norm=max_grad_norm, **options)

    if wrapper == "ddp":
        trained = DistributedDataParallel(net)
        optimizer = optimizer_on(backend)
    elif wrapper.startswith("fsdp"):
        fully_shard(net[0])
        if wrapper in FULLY_SHARDED:
            fully_shard(net[2])
            fully_shard(net)
        trained = net
        optimizer = optimizer_on(backend)
    else:
        trained = net
        extra = dict(foreach=False) if backend is None else dict(backend=backend, max_grad_norm=max_grad_norm)
        optimizer_class = torch.optim.AdamW if backend is None else FusedAdamW
        optimizer = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=optimizer_class, **options, **extra)
    norms = []
    generator = torch.Generator().manual_seed(zlib.crc32(f"{case}/{rank}".encode()))
    for step in range(STEPS):
        if wrapper == "fsdp-handover" and backend is not None and step in HANDOVER_STEPS:
            saved = get_optimizer_state_dict(net, optimizer)
            optimizer = optimizer_on(None if isinstance(optimizer, FusedAdamW) else backend)
            if step in HANDOVER_THROUGH_FILES:
                folder = CHECKPOINTS[0] / f"{case}-{backend}-{step}"
                dcp.save({"optim": saved}, checkpoint_id=folder)
                # (Without grads, torch's get_optimizer_state_dict creates the state the load fills in place.)
                optimizer.zero_grad(set_to_none=True)
                saved = {"optim": get_optimizer_state_dict(net, optimizer)}
                dcp.load(saved, checkpoint_id=folder)
                saved = saved["optim"]
            set_optimizer_state_dict(net, optimizer, optim_state_dict=saved)
        inputs = torch.randn(BATCH, IN, generator=generator)
        targets = torch.randn(BATCH, OUT, generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(trained(inputs), targets).backward()
        if max_grad_norm is not None and backend is None:
            norms.append(clip_grad_norm(list(net.parameters()), max_grad_norm))
        optimizer.step()
    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        state_dict = optimizer.state_dict() if rank == 0 else None
    else:
        state_dict = optimizer.state_dict()
    result = {
        "initial": initial,
        "params": [full(p) for p in net.parameters()],
        "state": state_summary(state_dict),
        "norms": norms,
        "selected_backends": getattr(inner, "selected_backends", None),
        "local_shapes": [tuple(p.to_local().shape) for p in net.parameters() if isinstance(p, DTensor)],
    }
    if wrapper in FULLY_SHARDED:  # distributed checkpointing's full optimizer state dict, keyed by parameter name
        options = StateDictOptions(full_state_dict=True)
        result["dcp"] = {
            name: {key: full(value) for key, value in state.items()}
            for name, state in get_optimizer_state_dict(net, optimizer, options=options)["state"].items()
        }
    return result


def functional_and_bad_inputs(backend: str, world: int) -> dict:
    """fused_adam on DTensors (their local shards) against fused_adam on the full tensors, and the errors
    FusedAdamW gives for a grad sharded unlike its param and for 8-bit moments of DTensor params."""
    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(5)  # the same full tensors on every rank
    full_tensors = [torch.randn(7, 3, generator=generator) for _ in range(2)] + [torch.rand(7, 3, generator=generator)]
    plain = [t.clone() for t in full_tensors]
    sharded = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in full_tensors]
    options = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True, backend=backend)
    for param, grad, exp_avg_sq in (plain, sharded):
        fused_adam([param], [grad], [torch.zeros_like(param)], [exp_avg_sq], [], [torch.tensor(0.0)], **options)
    checks = {"functional": [(full(ours), expected) for ours, expected in zip(sharded, plain, strict=True)]}
    for master_weights in (True, "lean"):  # bf16 params with an fp32 master or a 16-bit remainder beside them
        results = []
        for wrap in (lambda t: t, lambda t: distribute_tensor(t, mesh, [Shard(0)])):
            param = torch.nn.Parameter(wrap(full_tensors[0].to(torch.bfloat16)))
            optimizer = FusedAdamW([param], lr=0.1, backend=backend, master_weights=master_weights)
            for grad in full_tensors[1:]:
                param.grad = wrap(grad.to(torch.bfloat16))
                optimizer.step()
            results.append({key: full(value) for key, value in [("param", param), *optimizer.state[param].items()]})
        checks[f"master_weights={master_weights}"] = results
    param = torch.nn.Parameter(distribute_tensor(full_tensors[0].clone(), mesh, [Shard(0)]))
    for name, grad, extra in [
        ("plain grad", full_tensors[1].clone(), {}),
        ("replicated grad", distribute_tensor(full_tensors[1].clone(), mesh, [Replicate()]), {}),
        ("8bit", distribute_tensor(full_tensors[1].clone(), mesh, [Shard(0)]), {"state_dtype": "8bit"}),
    ]:
        param.grad = grad
        try:
            FusedAdamW([param], backend=backend, **extra).step()
            checks[name] = None
        except (TypeError, ValueError) as error:
            checks[name] = f"{type(error).__name__}: {error}"
    return checks


def run_cases(rank: int, world: int, backends: list[str], record: Callable[[str, object], None]) -> None:
    for case, (wrapper, options) in CASES.items():
        record(f"{case}/torch.optim", train(wrapper, options, None, rank, case))
        for backend in backends:
            record(f"{case}/{backend}", train(wrapper, options, backend, rank, case))
    for backend in backends:
        record(f"checks/{backend}", functional_and_bad_inputs(backend, world))


def main(rank: int, world: int, store: str, out: Path, backends: list[str]) -> int:
    import adam_gpu

    results: dict[str, object] = {"adam_gpu": adam_gpu.__file__, "error": None}
    CHECKPOINTS.append(out)
    store_url = f"file://{store}"
    dist.init_process_group("gloo", init_method=store_url, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        run_cases(rank, world, backends, results.__setitem__)
    except BaseException:
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, out / f"rank{rank}.pt")
    if results["error"] is None:
        dist.destroy_process_group()
    return 0 if results["error"] is None else 1


if __name__ == "__main__":
    rank_arg, world_arg, store_arg, out_arg, backends_arg = sys.argv[1:]
    sys.exit(main(int(rank_arg), int(world_arg), store_arg, Path(out_arg), [b for b in backends_arg.split(",") if b]))
