"""torch.compile: a compiled training step that calls ``optimizer.step()`` trains exactly as the eager one.

Dynamo traces ``FusedAdam.step`` (adam_gpu.compiled_step): each param group's step is one ``adam_gpu::adam_step_``
custom op in the graph, which launches the same kernel as the eager step; the forward and backward around it
are compiled as usual. (tests/test_torch_compile.py: fullgraph, graph breaks, recompiles, the op's fake impl.)
A float lr, as here, is a constant of the graph: a scheduler changing it recompiles; a tensor lr does not.
"""

from __future__ import annotations

import pytest
import torch
from support import DEVICE, backend_params, seeded_generator

from adam_gpu import FusedAdamW

STEPS = 3


def _train(
    backend: str, compiler: str | None, compile_step_only: bool = False
) -> tuple[list[torch.Tensor], FusedAdamW]:
    """The params of a small MLP after STEPS steps, the training step (or only ``optimizer.step``) compiled
    with ``compiler`` (None: eager)."""
    generator = seeded_generator("compile", backend)
    inputs = torch.randn(32, 9, generator=generator).to(DEVICE)
    targets = torch.randn(32, 1, generator=generator).to(DEVICE)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 1)).to(DEVICE)
    optimizer = FusedAdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, backend=backend)
    start = [p.detach().clone() for p in model.parameters()]

    def train_step() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    optimizer_step = optimizer.step
    if compiler is not None and compile_step_only:
        optimizer.step = torch.compile(optimizer_step, backend=compiler)
    elif compiler is not None:
        train_step = torch.compile(train_step, backend=compiler)
    for _ in range(STEPS):
        train_step()
    assert not any(torch.equal(p, s) for p, s in zip(model.parameters(), start, strict=True)), "nothing trained"
    return [p.detach().clone() for p in model.parameters()], optimizer


def _assert_same_training(compiled: list[torch.Tensor], eager: list[torch.Tensor], rtol: float) -> None:
    for index, (param, expected) in enumerate(zip(compiled, eager, strict=True)):
        torch.testing.assert_close(param, expected, rtol=rtol, atol=rtol, msg=lambda m, i=index: f"param {i}: {m}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("compile_step_only", [False, True], ids=["train-step", "optimizer-step"])
def test_compiled_training_step_trains_as_eager(backend, compile_step_only):
    # aot_eager traces forward and backward as inductor does but runs them with eager kernels: the same bits.
    eager, _ = _train(backend, None)
    compiled, optimizer = _train(backend, "aot_eager", compile_step_only)
    assert optimizer.selected_backends == [backend], "the step did not run adam-gpu's kernel"
    _assert_same_training(compiled, eager, rtol=0)


def test_inductor_training_step_trains_as_eager():
    # Inductor fuses the forward and backward into C++ kernels of its own, rounding differently (fp32).
    eager, _ = _train("auto", None)
    compiled, optimizer = _train("auto", "inductor")
    assert optimizer.selected_backends[0] is not None
    _assert_same_training(compiled, eager, rtol=1e-5)
