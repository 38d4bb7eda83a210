"""torch.compile traces ``FusedAdam.step`` into its graph (adam_gpu.compiled_step): ``fullgraph=True`` compiles,
the compiled step runs adam-gpu's kernels, one launch per group, bit for bit as the eager step, a training step
breaks its graph only where torch.optim.AdamW(fused=True)'s breaks, and a scheduled tensor lr recompiles nothing.

On the CPU the Triton kernel runs under Triton's interpreter; CUDA cases (capturable, CUDA graphs) run where a GPU is.
"""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch
from support import (
    DEVICE,
    assert_unchanged,
    backend_params,
    new_grads,
    optimizer_tensors,
    random_tensor,
    seeded_generator,
    snapshot,
)
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from adam_gpu import FusedAdam, FusedAdamW, dispatch

STEPS = 3
SHAPES = [(5, 3), (4097,), (2,)]
# The real backends (cuda-host, the tests' emulation of the CUDA C kernel, is left to the eager tests).
BACKENDS = [param for param in backend_params() if param.values[0] in ("triton", "cupy", "torch")]
# Each case: the optimizer class, its arguments, the params' dtype.
CASES = {
    "adamw": (FusedAdamW, {}, torch.float32),
    "adam-amsgrad-decay-maximize": (FusedAdam, {"amsgrad": True, "weight_decay": 0.1, "maximize": True}, torch.float32),
    "capturable-clipped": (FusedAdamW, {"capturable": True, "max_grad_norm": 0.5}, torch.float32),
    "bf16-master": (FusedAdamW, {"master_weights": True}, torch.bfloat16),
    "bf16-lean-master": (FusedAdamW, {"master_weights": "lean"}, torch.bfloat16),
    "8bit-moments": (FusedAdamW, {"state_dtype": "8bit"}, torch.float32),  # (only the 4097-element param quantized)
}
COMPILERS = ["aot_eager", "inductor"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _optimizer_pair(case: str, backend: str, generator: torch.Generator):
    """Two optimizers over equal params, in two groups (the second's last param never has a grad), each group's lr
    a tensor of its own. On CUDA both are capturable: dynamo makes a CUDA group capturable before its first step
    (as for torch's optimizers), and the eager twin must step alike."""
    optimizer_class, options, dtype = CASES[case]
    capturable = options.get("capturable", False) or DEVICE.type == "cuda"
    lr_device = DEVICE if capturable else torch.device("cpu")
    start = [random_tensor(generator, *shape, dtype=dtype) for shape in SHAPES]
    pair = []
    for _ in range(2):
        params = [p.clone().requires_grad_() for p in start]
        lrs = [torch.tensor(lr, device=lr_device) for lr in (2e-2, 5e-3)]
        groups = [{"params": params[:1], "lr": lrs[0]}, {"params": params[1:], "lr": lrs[1]}]
        optimizer = optimizer_class(groups, lr=lrs[0], backend=backend, **{**options, "capturable": capturable})
        pair.append((params, optimizer))
    return pair


def _fresh_grads(generator: torch.Generator, *param_lists: list[torch.Tensor]) -> None:
    new_grads(generator, *param_lists)
    for params in param_lists:
        params[-1].grad = None


def _assert_same_bits(compiled: torch.optim.Optimizer, eager: torch.optim.Optimizer, params, twins) -> None:
    for index, (param, twin) in enumerate(zip(params, twins, strict=True)):
        assert torch.equal(param, twin), f"param {index} differs from the eager step's"
        state, eager_state = compiled.state.get(param, {}), eager.state.get(twin, {})
        assert state.keys() == eager_state.keys(), f"param {index}: state {sorted(state)} vs {sorted(eager_state)}"
        for key, value in state.items():
            assert value.dtype == eager_state[key].dtype and value.device == eager_state[key].device, key
            assert torch.equal(value, eager_state[key]), f"param {index} {key} differs from the eager step's"


def _count_launches(backend: str):
    """Patches the backend's ``adam_step`` (what each group's launch goes through) to count its calls."""
    module = dispatch.BACKENDS[backend].load()
    return mock.patch.object(module, "adam_step", side_effect=module.adam_step)


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_step_is_bitwise_eager(backend, case, compiler):
    generator = seeded_generator("torch-compile", backend, case, compiler)
    (params, compiled), (twins, eager) = _optimizer_pair(case, backend, generator)
    step = torch.compile(compiled.step, backend=compiler, fullgraph=True)
    for _ in range(STEPS):
        _fresh_grads(generator, params, twins)
        eager.step()
        with _count_launches(backend) as launches:
            step()
        assert launches.call_count == 2, "one launch per group with grads, as the eager step"
        _assert_same_bits(compiled, eager, params, twins)
    assert compiled.selected_backends == eager.selected_backends == [backend, backend]


def _train(optimizer_class, backend: str | None, compiler: str | None, explain: bool = False):
    """A small MLP trained for STEPS steps by a function that runs forward, backward and ``optimizer.step()``,
    compiled with ``compiler`` (None: eager); with ``explain``, dynamo's account of it instead."""
    generator = seeded_generator("torch-compile-train", backend)
    inputs, targets = random_tensor(generator, 32, 9), random_tensor(generator, 32, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 1)).to(DEVICE)
    options = {} if backend is None else {"backend": backend, "max_grad_norm": 1.0}
    optimizer = optimizer_class(model.parameters(), lr=torch.tensor(1e-2), **options)

    def train_step() -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    if explain:
        return torch._dynamo.explain(train_step)()
    run = train_step if compiler is None else torch.compile(train_step, backend=compiler)
    for _ in range(STEPS):
        optimizer.zero_grad()
        run()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_breaks_only_where_torch_fused_adamw_does(backend):
    ours = _train(FusedAdamW, backend, None, explain=True)
    torch._dynamo.reset()
    torchs = _train(functools.partial(torch.optim.AdamW, fused=True), None, None, explain=True)
    # Dynamo breaks at loss.backward() (as for any optimizer); never at the step.
    assert ours.graph_break_count == torchs.graph_break_count == 1
    assert [r.reason.splitlines()[0] for r in ours.break_reasons] == ["Unsupported Tensor.backward() call"]
    assert any("adam_gpu.adam_step_" in str(graph.graph) for graph in ours.graphs), "the step is not in a graph"
    torch._dynamo.reset()
    assert all(map(torch.equal, _train(FusedAdamW, backend, "aot_eager"), _train(FusedAdamW, backend, None)))


# A scheduler wraps optimizer.step in a function of a file dynamo never traces (for torch's optimizers too): the
# step is compiled before the scheduler wraps it, so the scheduler does not see it called.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduled_tensor_lr_does_not_recompile(backend):
    generator = seeded_generator("torch-compile-lr", backend)
    (params, compiled), (twins, eager) = _optimizer_pair("adamw", backend, generator)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(compiled.step, backend=counter, fullgraph=True)
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5) for o in (compiled, eager)]
    for _ in range(STEPS + 1):
        _fresh_grads(generator, params, twins)
        eager.step()
        step()
        for scheduler in schedulers:
            scheduler.step()
        _assert_same_bits(compiled, eager, params, twins)
    assert float(compiled.param_groups[0]["lr"]) == pytest.approx(2e-2 * 0.5 ** (STEPS + 1), rel=1e-6)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for {STEPS + 1} steps"


def test_new_state_at_a_later_step_recompiles_once():
    # A param that gets its first grad later needs state the graph does not have: one new graph, then none.
    generator = seeded_generator("torch-compile-late-param")
    (params, compiled), (twins, eager) = _optimizer_pair("adamw", "torch", generator)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(compiled.step, backend=counter, fullgraph=True)
    for index in range(STEPS + 1):
        new_grads(generator, params, twins)
        if index == 0:
            params[-1].grad = twins[-1].grad = None
        eager.step()
        step()
        _assert_same_bits(compiled, eager, params, twins)
    assert counter.frame_count == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_and_compiled_steps_interleave(backend):
    # The state an eager step creates serves the compiled one and the other way round; a group without grads
    # is left out by both.
    generator = seeded_generator("torch-compile-interleave", backend)
    (params, mixed), (twins, eager) = _optimizer_pair("capturable-clipped", backend, generator)
    value = random_tensor(generator, 4)
    frozen = [value.clone().requires_grad_() for _ in range(2)]
    for optimizer, param in ((mixed, frozen[0]), (eager, frozen[1])):
        optimizer.add_param_group({"params": [param]})
    compiled = torch.compile(mixed.step, backend="aot_eager", fullgraph=True)
    for step in (compiled, mixed.step, compiled, compiled, mixed.step):
        _fresh_grads(generator, params, twins)
        eager.step()
        step()
        _assert_same_bits(mixed, eager, [*params, frozen[0]], [*twins, frozen[1]])
    assert mixed.selected_backends == [backend, backend, None]


def _op_arguments(generator: torch.Generator, amsgrad: bool, master: bool, capturable: bool) -> tuple:
    """Arguments of one adam_gpu::adam_step_ call over fresh tensors (masters: one fp32 master for a bf16 param)."""
    dtype = torch.bfloat16 if master else torch.float32
    params = [random_tensor(generator, *shape, dtype=dtype) for shape in SHAPES]
    moments = [[random_tensor(generator, *p.shape, dtype=dtype).abs() for p in params] for _ in range(3)]
    steps = [torch.tensor(3.0, device=DEVICE if capturable else "cpu") for _ in params]
    masters = [params[1].float()] if master else []
    return (
        params,
        [random_tensor(generator, *p.shape, dtype=dtype) for p in params],
        moments[0],
        moments[1],
        moments[2] if amsgrad else [],
        steps,
        masters,
        [],
        [],
        [1] if master else [],
        [],
        1e-3,
        torch.tensor(1e-3, device=DEVICE) if capturable else None,
        0.9,
        0.999,
        1e-8,
        0.01,
        True,
        amsgrad,
        False,
        capturable,
        "torch",
        None,
        None,
        torch.tensor(0.5, device=DEVICE) if capturable else None,
    )


@pytest.mark.parametrize(
    "amsgrad, master, capturable", [(False, False, False), (True, False, True), (False, True, False)]
)
def test_custom_op_fake_and_mutations_are_consistent(amsgrad, master, capturable):
    # opcheck: every tensor the op writes is declared, the fake impl agrees with the real one, and it runs traced.
    generator = seeded_generator("torch-compile-opcheck", amsgrad, master, capturable)
    torch.library.opcheck(torch.ops.adam_gpu.adam_step_.default, _op_arguments(generator, amsgrad, master, capturable))
    grads = [random_tensor(generator, *shape) for shape in SHAPES]
    torch.library.opcheck(torch.ops.adam_gpu.clip_coefficient.default, (grads, 1.0, None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_overhead_capturable_is_bitwise_eager(backend):
    # mode="reduce-overhead": inductor replays the step as a CUDA graph, which reads lr and step counts on the device.
    generator = seeded_generator("torch-compile-cudagraph", backend)
    (params, compiled), (twins, eager) = _optimizer_pair("capturable-clipped", backend, generator)
    step = torch.compile(compiled.step, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    for _ in range(STEPS + 2):
        _fresh_grads(generator, params, twins)
        eager.step()
        step()
        _assert_same_bits(compiled, eager, params, twins)
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor ran the step without a CUDA graph"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_group_stops_the_compile_before_any_state_is_made(backend):
    generator = seeded_generator("torch-compile-bad-input", backend)
    (params, optimizer), _ = _optimizer_pair("adamw", backend, generator)
    _fresh_grads(generator, params)
    params[1].grad = params[1].grad.to_sparse()  # refused (sparse), in the second group
    before = snapshot(optimizer_tensors(optimizer))
    with pytest.raises(Exception, match="grad"):
        torch.compile(optimizer.step, backend="aot_eager", fullgraph=True)()
    assert_unchanged(before, optimizer_tensors(optimizer))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_calls_reuse_their_checks_until_a_tensor_moves(backend):
    """The op skips the full checks for tensors its last full check passed (custom_op._Checked), and takes them
    again for a state tensor moved in place (``.data =``, the same object), which dynamo's guards do not see."""
    from adam_gpu import custom_op

    generator = seeded_generator("compiled reuse", backend)
    (params, compiled), (twins, eager) = _optimizer_pair("adamw", backend, generator)
    step = torch.compile(compiled.step, backend="inductor")
    full_checks = []
    index_now = [0]
    still_checked = custom_op._still_checked

    def counted(tensors, steps, capturable):
        found = still_checked(tensors, steps, capturable)
        if found is None:
            full_checks.append((index_now[0], len(tensors)))
        return found

    with mock.patch.object(custom_op, "_still_checked", counted):
        for index in range(4):
            index_now[0] = index
            if index == 2:
                for optimizer, param in ((compiled, params[1]), (eager, twins[1])):
                    moment = optimizer.state[param]["exp_avg"]
                    moment.data = moment.data.clone()  # other memory, same values
            _fresh_grads(generator, params, twins)
            step()
            eager.step()
            _assert_same_bits(compiled, eager, params, twins)
    # The first two calls trace (the second again, once the state exists) and check each group in full; after
    # that only the group whose moment moved is checked again.
    assert [index for index, _ in full_checks if index >= 2] == [2], full_checks
