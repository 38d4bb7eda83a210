"""20-step training of a small real model (an MLP on scikit-learn's digits, shipped with the package):
FusedAdam/FusedAdamW against torch.optim.Adam/AdamW, params and moments, with the optimizer's state
moved through ``state_dict`` at step 10 in both directions (ours -> torch, torch -> ours)."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from support import DEVICE, OPTIMIZERS, assert_close_relative, backend_params

from adam_gpu import FusedAdam

STEPS = 20
SWAP_AT = 10
BATCH = 64
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _digits_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    # The test extra installs scikit-learn; a GPU machine without it still runs the other test files.
    images, labels = pytest.importorskip("sklearn.datasets").load_digits(return_X_y=True)
    inputs = torch.tensor(images / 16.0, dtype=torch.float32, device=DEVICE)
    targets = torch.tensor(labels, device=DEVICE)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    return [(inputs[order[i : i + BATCH]], targets[order[i : i + BATCH]]) for i in range(0, STEPS * BATCH, BATCH)]


BATCHES = _digits_batches()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)).to(DEVICE)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.step(functools.partial(_loss_and_grads, model, optimizer, *BATCHES[step]))


def _loss_and_grads(model, optimizer, inputs, targets) -> torch.Tensor:
    """The closure a training loop hands to ``optimizer.step``."""
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    return loss


def _through_bytes(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _assert_same_training(model, optimizer, expected_model, expected_optimizer) -> None:
    params = list(model.parameters())
    expected_params = list(expected_model.parameters())
    for index, (param, expected) in enumerate(zip(params, expected_params, strict=True)):
        assert_close_relative(param, expected, f"param {index}")
        for name in MOMENTS:
            if name in expected_optimizer.state[expected]:
                assert_close_relative(
                    optimizer.state[param][name], expected_optimizer.state[expected][name], f"{name} of param {index}"
                )
        assert float(optimizer.state[param]["step"]) == float(expected_optimizer.state[expected]["step"]) == STEPS


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("handover", ["none", "ours-to-torch", "torch-to-ours"])
def test_training_matches_torch_optim(backend, kind, amsgrad, handover):
    ours_class, torch_class = OPTIMIZERS[kind]
    options = dict(lr=3e-3, weight_decay=0.05, amsgrad=amsgrad)

    expected_model = _model()
    expected_optimizer = torch_class(expected_model.parameters(), foreach=False, **options)
    _train(expected_model, expected_optimizer, range(STEPS))

    model = _model()

    def ours() -> FusedAdam:
        return ours_class(model.parameters(), backend=backend, **options)

    def theirs() -> torch.optim.Optimizer:
        return torch_class(model.parameters(), foreach=False, **options)

    first, second = {"none": (ours, None), "ours-to-torch": (ours, theirs), "torch-to-ours": (theirs, ours)}[handover]
    optimizer = first()
    _train(model, optimizer, range(SWAP_AT))
    if second is not None:
        saved = _through_bytes(optimizer.state_dict())
        optimizer = second()
        optimizer.load_state_dict(saved)
    _train(model, optimizer, range(SWAP_AT, STEPS))

    _assert_same_training(model, optimizer, expected_model, expected_optimizer)
    if isinstance(optimizer, FusedAdam):
        assert optimizer.selected_backends == [backend]
