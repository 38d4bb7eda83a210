"""What only a GPU shows: streams, host synchronization, alignment of the vector path, 64-bit indices.

The shared correctness tests (test_step.py, test_training.py, ...) run on the GPU too when one is
present: there every backend is compared with the float64 reference and with torch.optim's for-loop
and fused AdamW on the device. These tests add the GPU-only properties.
"""

from __future__ import annotations

import pytest
import torch
from support import (
    POLICIES,
    StepCase,
    assert_close_relative,
    assert_correctly_rounded,
    backend_params,
    fused_step,
    policy_id,
    seeded_generator,
)

from adam_gpu import FusedAdamW
from adam_gpu.backends import tensor_table
from adam_gpu.hyperparameters import AdamHyperparameters

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]
HP = AdamHyperparameters(1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled=True, amsgrad=True, maximize=False)


def _run(backend: str, case: StepCase, param_dtype: torch.dtype, state_dtype: torch.dtype, offsets=(0, 0, 0)):
    """One fused_adam step on views starting ``offsets`` elements into their buffers (param, grad, moments)."""

    def placed(values: torch.Tensor, dtype: torch.dtype, offset: int) -> torch.Tensor:
        buffer = torch.full((values.numel() + offset,), float("nan"), dtype=dtype, device="cuda")
        view = buffer[offset:]
        view.copy_(values)
        return view

    param = placed(case.param, param_dtype, offsets[0])
    grad = placed(case.grad, param_dtype, offsets[1])
    moments = [placed(v, state_dtype, offsets[2]) for v in (case.exp_avg, case.exp_avg_sq, case.max_exp_avg_sq)]
    fused_step(param, grad, moments, torch.tensor(float(case.step - 1)), HP, backend)
    torch.cuda.synchronize()
    return param, *moments


def _check(outputs, case: StepCase) -> None:
    expected = case.reference(HP)
    names = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for name, actual in zip(names, outputs, strict=True):
        check = assert_close_relative if actual.dtype == torch.float32 else assert_correctly_rounded
        check(actual, getattr(expected, name), name, getattr(case, name))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("policy", POLICIES, ids=policy_id)
@pytest.mark.parametrize("offsets", [(0, 0, 0), (1, 0, 0), (0, 3, 0), (0, 0, 7), (8, 1, 4)], ids=str)
@pytest.mark.parametrize("size", [1, 15, 4097, 1_000_003])
def test_misaligned_views_take_the_scalar_path_correctly(backend, policy, offsets, size):
    param_dtype, state_dtype = policy
    state_dtype = state_dtype or param_dtype
    case = StepCase.draw(size, seeded_generator("gpu-offsets", backend, policy, offsets, size))
    case = case.rounded(param_dtype, state_dtype)
    _check(_run(backend, case, param_dtype, state_dtype, offsets), case)


@pytest.mark.parametrize("backend", backend_params())
def test_step_runs_on_the_current_stream(backend):
    """Grads written on a side stream after a long sleep: a kernel launched on any other stream would
    read them before they exist."""
    generator = seeded_generator("gpu-stream", backend)
    source = torch.randn(1 << 20, generator=generator).cuda()
    expected_param = torch.randn(1 << 20, generator=generator).cuda()
    param = expected_param.clone().requires_grad_()
    reference = expected_param.clone().requires_grad_()
    ours = FusedAdamW([param], lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW([reference], lr=1e-2, fused=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        param.grad = torch.full_like(param, float("nan"))
        torch.cuda._sleep(50_000_000)  # about 25 ms of GPU time before the grads are written
        param.grad.copy_(source)
        ours.step()
    torch.cuda.synchronize()
    reference.grad = source.clone()
    theirs.step()
    assert_close_relative(param, reference, "param")


@pytest.mark.parametrize("backend", backend_params())
def test_a_step_from_a_thread_new_to_cuda_is_right(backend):
    """The first step of a thread that has made no CUDA call (the CuPy launcher goes to the driver, which needs the
    thread's context current) matches torch fused, as a step on the main thread does."""
    import threading

    generator = seeded_generator("gpu-thread", backend)
    start = torch.randn(65537, generator=generator).cuda()
    grad = torch.randn(65537, generator=generator).cuda()
    param, reference = start.clone().requires_grad_(), start.clone().requires_grad_()
    param.grad, reference.grad = grad.clone(), grad.clone()
    ours = FusedAdamW([param], lr=1e-2, backend=backend)
    errors = []

    def step() -> None:
        try:
            ours.step()
            torch.cuda.synchronize()
        except Exception as error:  # (re-raised on the test's thread)
            errors.append(error)

    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
    assert not errors, errors
    torch.optim.AdamW([reference], lr=1e-2, fused=True).step()
    assert_close_relative(param, reference, "param")


@pytest.mark.parametrize("backend", backend_params())
def test_step_does_not_synchronize_the_host(backend):
    generator = seeded_generator("gpu-sync", backend)
    params = [torch.randn(n, generator=generator).cuda().requires_grad_() for n in (1, 4097, 65537)]
    optimizer = FusedAdamW(params, lr=1e-3, backend=backend)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()  # compile and load outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.xdist_group("gpu-memory")  # 20+ GB: one at a time when pytest-xdist runs tests in parallel
@pytest.mark.parametrize("backend", backend_params())
def test_64_bit_indices(backend):
    """A bf16 tensor of more than 2**31 elements: the last elements are updated like the first."""
    n = 2**31 + 17
    # Five bf16 tensors (10 bytes an element), and for the torch backend its fp32 working copies of all five
    # and a square root's (24 more): 73 GB there, while 8 test workers may share the GPU.
    needed = (10 if backend != "torch" else 34) * n + 2**30
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    generator = seeded_generator("gpu-64bit", backend)
    head = StepCase.draw(64, generator).rounded(torch.bfloat16, torch.bfloat16)
    tensors = []
    try:
        for values in (head.param, head.grad, head.exp_avg, head.exp_avg_sq, head.max_exp_avg_sq):
            full = torch.empty(n, dtype=torch.bfloat16, device="cuda")
            full[:64] = values.to(torch.bfloat16)
            full[-64:] = values.to(torch.bfloat16)
            tensors.append(full)
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq = tensors
        steps = torch.tensor(float(head.step - 1))
        fused_step(param, grad, [exp_avg, exp_avg_sq, max_exp_avg_sq], steps, HP, backend)
        for part in (slice(0, 64), slice(n - 64, n)):
            _check([t[part].clone() for t in (param, exp_avg, exp_avg_sq, max_exp_avg_sq)], head)
    finally:  # a failed check must not leave 20 GB to the next test of the group (its traceback keeps our frame)
        tensors.clear()
        full = param = grad = exp_avg = exp_avg_sq = max_exp_avg_sq = None  # noqa: F841
        torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", backend_params())
def test_captured_step_replays_equal_eager_steps(backend):
    """capturable=True: one step() captured in a CUDA graph and replayed with new grads and a new lr (changed
    in place, as a scheduler does for a tensor lr) gives the same params, moments and steps as eager steps."""
    generator = seeded_generator("gpu-graph", backend)
    shapes = [(1000, 37), (4097,), (1,)]
    params = [torch.randn(shape, generator=generator).cuda().requires_grad_() for shape in shapes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    lr, twin_lr = torch.tensor(1e-2, device="cuda"), torch.tensor(1e-2, device="cuda")
    captured = FusedAdamW(params, lr=lr, capturable=True, amsgrad=True, backend=backend)
    eager = FusedAdamW(twins, lr=twin_lr, capturable=True, amsgrad=True, backend=backend)
    for p, q in zip(params, twins, strict=True):
        p.grad = torch.randn(p.shape, generator=generator).cuda()
        q.grad = p.grad.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels and builds the tensor table before capture
        for _ in range(3):
            captured.step()
            eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()

    for replay in range(5):
        for p, q in zip(params, twins, strict=True):
            p.grad.copy_(torch.randn(p.shape, generator=generator).cuda())
            q.grad.copy_(p.grad)
        lr.fill_(1e-2 * 0.7**replay)
        twin_lr.fill_(1e-2 * 0.7**replay)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for index, (p, q) in enumerate(zip(params, twins, strict=True)):
        assert_close_relative(p, q, f"param {index}")
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert_close_relative(captured.state[p][key], eager.state[q][key], f"{key} {index}")
    assert float(captured.state[params[0]]["step"]) == 3 + 5


@pytest.mark.parametrize("backend", backend_params())
def test_a_whole_training_step_captured_with_its_grads_replays_as_eager_steps(backend):
    """The recipe of torch's CUDA-graph docs: warm-up on a side stream, zero_grad(set_to_none=True), then
    forward, backward and step() captured together, so the grads (and the tensor table that holds their
    addresses) are allocated inside the capture. Replays with new inputs and a scheduled lr tensor give what
    the same steps give eagerly, and training goes on from the replayed state."""
    generator = seeded_generator("gpu-whole-graph", backend)

    def model_and_optimizer() -> tuple[torch.nn.Module, torch.Tensor, FusedAdamW]:
        torch.manual_seed(1234)  # the same initial weights for both
        model = torch.nn.Sequential(torch.nn.Linear(64, 257), torch.nn.GELU(), torch.nn.Linear(257, 10)).cuda()
        lr = torch.tensor(1e-2, device="cuda")
        return model, lr, FusedAdamW(model.parameters(), lr=lr, capturable=True, amsgrad=True, backend=backend)

    def train_step(model: torch.nn.Module, optimizer: FusedAdamW, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(32, 64, generator=generator).cuda(), torch.randint(0, 10, (32,), generator=generator).cuda()

    graphed, graphed_lr, graphed_optimizer = model_and_optimizer()
    eager, eager_lr, eager_optimizer = model_and_optimizer()
    static_x, static_y = batch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, compiled kernels
        for _ in range(3):
            for model, optimizer in ((graphed, graphed_optimizer), (eager, eager_optimizer)):
                optimizer.zero_grad(set_to_none=True)
                train_step(model, optimizer, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graphed_optimizer.zero_grad(set_to_none=True)  # the grads are allocated inside the capture
    with torch.cuda.graph(graph):
        static_loss = train_step(graphed, graphed_optimizer, static_x, static_y)

    for replay in range(5):
        x, y = batch()
        static_x.copy_(x)
        static_y.copy_(y)
        for lr in (graphed_lr, eager_lr):
            lr.fill_(1e-2 * 0.7**replay)
        graph.replay()
        eager_optimizer.zero_grad(set_to_none=True)
        eager_loss = train_step(eager, eager_optimizer, x, y)
        # Same kernels on the same data: equal but for cuBLAS's choice of algorithm, so a loose fp32 bound.
        assert_close_relative(static_loss, eager_loss, f"loss after replay {replay}", rtol=1e-5)
    torch.cuda.synchronize()
    for index, (p, q) in enumerate(zip(graphed.parameters(), eager.parameters(), strict=True)):
        assert_close_relative(p, q, f"param {index}", rtol=1e-5)
        graphed_state, eager_state = graphed_optimizer.state[p], eager_optimizer.state[q]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert_close_relative(graphed_state[key], eager_state[key], f"{key} {index}", rtol=1e-5)
    assert float(graphed_optimizer.state[next(graphed.parameters())]["step"]) == 3 + 5


@pytest.mark.parametrize("backend", backend_params())
def test_an_eager_step_on_the_captured_grads_before_any_replay_is_right(backend):
    """A tensor table made while capturing is written on the device only by the graph's replays. An eager
    step() that uses it first (the captured grads filled in place, no replay yet) must write it itself, or the
    kernel would follow unwritten addresses."""
    generator = seeded_generator("gpu-eager-before-replay", backend)
    torch.manual_seed(99)
    graphed_model = torch.nn.Sequential(torch.nn.Linear(32, 129), torch.nn.Linear(129, 7)).cuda()
    eager_params = [p.detach().clone().requires_grad_() for p in graphed_model.parameters()]
    graphed = FusedAdamW(graphed_model.parameters(), lr=1e-2, capturable=True, backend=backend)
    eager = FusedAdamW(eager_params, lr=1e-2, capturable=True, backend=backend)
    x, y = torch.randn(16, 32, generator=generator).cuda(), torch.randint(0, 7, (16,), generator=generator).cuda()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    warm_up_grads = []  # kept: the captured grads must not get their addresses (and so their tables)
    with torch.cuda.stream(side):  # warm-up: state, compiled kernels, cuBLAS (both optimizers alike)
        for _ in range(2):
            torch.nn.functional.cross_entropy(graphed_model(x), y).backward()  # (grads replaced below)
            for p, q in zip(graphed_model.parameters(), eager_params, strict=True):
                warm_up_grads += [p.grad]
                p.grad = torch.randn(p.shape, generator=generator).cuda()
                q.grad = p.grad.clone()
            graphed.step()
            eager.step()
            warm_up_grads += [p.grad for p in graphed_model.parameters()]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graphed.zero_grad(set_to_none=True)  # the grads are allocated inside the capture
    unwritten_before = set(tensor_table._unwritten)
    with torch.cuda.graph(graph):
        torch.nn.functional.cross_entropy(graphed_model(x), y).backward()
        graphed.step()
    if backend != "torch":  # the kernels' backends: the step above made a table that only its graph writes
        assert set(tensor_table._unwritten) - unwritten_before, "the captured grads' table was made in the capture"

    for p, q in zip(graphed_model.parameters(), eager_params, strict=True):  # no replay: fill the grads here
        p.grad.copy_(torch.randn(p.shape, generator=generator).cuda())
        q.grad = p.grad.clone()
    graphed.step()
    eager.step()
    torch.cuda.synchronize()
    for index, (p, q) in enumerate(zip(graphed_model.parameters(), eager_params, strict=True)):
        assert_close_relative(p, q, f"param {index}")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_relative(graphed.state[p][key], eager.state[q][key], f"{key} {index}")
