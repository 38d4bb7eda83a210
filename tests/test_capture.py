"""What a step captured in a CUDA graph needs, checked on any machine by telling the optimizer and the
tensor tables that a capture is under way (``is_capturing``); tests/test_gpu.py captures real graphs.

A captured step must read everything that changes from the device and create nothing a replay would redo
(new moments would be zeroed again at every replay): otherwise step() refuses before writing anything.
A tensor table built during a capture (the whole training step captured, grads allocated inside it) is
copied from its host tensor at every replay: it keeps that host tensor and is never evicted.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from support import (
    DEVICE,
    assert_unchanged,
    backend_params,
    new_grads,
    optimizer_tensors,
    seeded_generator,
    small_params,
    snapshot,
)

from adam_gpu import FusedAdamW, optim
from adam_gpu.backends import tensor_table


@pytest.fixture
def capture(monkeypatch):
    """``capture(True)``: the steps from then on run as if torch.cuda.graph were capturing them."""

    def set_capturing(on: bool) -> None:
        monkeypatch.setattr(optim, "is_capturing", lambda device: on)
        monkeypatch.setattr(tensor_table, "is_capturing", lambda device: on)

    return set_capturing


def _warmed_up(backend: str, **options) -> tuple[FusedAdamW, list[torch.Tensor], torch.Generator]:
    generator = seeded_generator("capture", backend, *options)
    params = [p.to(DEVICE).requires_grad_() for p in small_params(generator)]
    optimizer = FusedAdamW(params, lr=1e-2, backend=backend, **options)
    new_grads(generator, params)
    optimizer.step()
    new_grads(generator, params)
    return optimizer, params, generator


@pytest.mark.parametrize(
    ("options", "lr", "message"),
    [
        ({}, None, "capturable=False"),
        ({"capturable": True}, torch.tensor(1e-2, device="meta"), "lr is a tensor on meta"),
    ],
    ids=["host-step-counts", "lr-elsewhere"],
)
def test_a_capture_that_would_freeze_host_values_is_refused_untouched(capture, options, lr, message):
    optimizer, _, _ = _warmed_up("torch", **options)
    capture(True)
    if lr is not None:
        optimizer.param_groups[0]["lr"] = lr
    before = snapshot(optimizer_tensors(optimizer))
    with pytest.raises(RuntimeError, match=message):
        optimizer.step()
    assert_unchanged(before, optimizer_tensors(optimizer))


def test_a_capture_before_the_first_step_is_refused_without_creating_state(capture):
    generator = seeded_generator("capture before state")
    params = [p.to(DEVICE).requires_grad_() for p in small_params(generator)]
    optimizer = FusedAdamW(params, lr=1e-2, capturable=True, backend="torch")
    new_grads(generator, params)
    capture(True)
    before = snapshot(optimizer_tensors(optimizer))
    with pytest.raises(RuntimeError, match="before param 0 has any state"):
        optimizer.step()
    assert_unchanged(before, optimizer_tensors(optimizer))
    assert not optimizer.state


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] in ("triton", "cupy", "cuda-host")])
def test_a_table_built_during_a_capture_outlives_the_cache(backend, capture, monkeypatch):
    """Grads allocated inside the capture get a new table there; it stays, with its host copy, however many
    tables come after it, and a later (captured or eager) step with the same tensors finds it."""
    monkeypatch.setattr(tensor_table, "_tables", OrderedDict())
    monkeypatch.setattr(tensor_table, "_captured", {})
    monkeypatch.setattr(tensor_table, "_CACHE_SIZE", 2)
    optimizer, params, generator = _warmed_up(backend, capturable=True)
    assert not tensor_table._captured, "an eager step keeps its tables in the evictable cache"

    capture(True)
    new_grads(generator, params)  # new grad storages, as when the captured backward allocates them
    captured_grads = [p.grad for p in params]
    optimizer.step()
    (key, table), *others = tensor_table._captured.items()
    assert not others, "one table for the group"
    on_device = torch.cat([table.pointers.flatten(), table.numels, table.chunk_offsets]).cpu()
    assert torch.equal(table.host, on_device), "the host copy a replay re-reads is the table"
    assert key not in tensor_table._tables

    capture(False)
    for _ in range(3):  # more eager tables than the cache holds
        new_grads(generator, params)
        optimizer.step()
    assert tensor_table._captured == {key: table} and len(tensor_table._tables) == 2
    cached = list(tensor_table._tables)
    for param, grad in zip(params, captured_grads, strict=True):
        param.grad = grad
    optimizer.step()
    assert list(tensor_table._tables) == cached, "the captured tensors' table was found, not rebuilt"
