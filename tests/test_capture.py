"""What a step captured in a CUDA graph needs, checked on any machine by telling the optimizer and the
tensor tables that a capture is under way (``is_capturing``); tests/test_gpu.py captures real graphs.

A captured step must read everything that changes from the device and create nothing a replay would redo
(new moments would be zeroed again at every replay): otherwise step() refuses before writing anything.
A tensor table built during a capture (the whole training step captured, grads allocated inside it) is written
on the device by kernels of the graph, at every replay; it keeps its host tensor (an eager step before any
replay writes the table from it) and is never evicted.
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
from torch.utils._python_dispatch import TorchDispatchMode

from adam_gpu import FusedAdamW, optim
from adam_gpu.backends import tensor_table
from adam_gpu.device_inputs import device_values


@pytest.fixture
def capture(monkeypatch):
    """``capture(True)``: the steps from then on run as if torch.cuda.graph were capturing them."""

    def set_capturing(on: bool) -> None:
        monkeypatch.setattr(optim, "is_capturing", lambda device: on)
        monkeypatch.setattr(tensor_table, "is_capturing", lambda device: on)

    return set_capturing


def _warmed_up(backend: str, **options) -> tuple[FusedAdamW, list[torch.Tensor], torch.Generator, list]:
    """An optimizer after one step, with new grads; and the grads of that step, to keep alive: on a GPU the
    caching allocator hands freed addresses out again, and new grads at the stepped ones' addresses would find
    that step's (written) table instead of making one."""
    generator = seeded_generator("capture", backend, *options)
    params = [p.to(DEVICE).requires_grad_() for p in small_params(generator)]
    optimizer = FusedAdamW(params, lr=1e-2, backend=backend, **options)
    new_grads(generator, params)
    optimizer.step()
    stepped_grads = [p.grad for p in params]
    new_grads(generator, params)
    return optimizer, params, generator, stepped_grads


@pytest.mark.parametrize(
    ("options", "lr", "message"),
    [
        ({}, None, "capturable=False"),
        ({"capturable": True}, torch.tensor(1e-2, device="meta"), "lr is a tensor on meta"),
    ],
    ids=["host-step-counts", "lr-elsewhere"],
)
def test_a_capture_that_would_freeze_host_values_is_refused_untouched(capture, options, lr, message):
    optimizer, *_ = _warmed_up("torch", **options)
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
    tables of other grads come after it, and a later (captured or eager) step with the same tensors finds it."""
    monkeypatch.setattr(tensor_table, "_tables", OrderedDict())
    monkeypatch.setattr(tensor_table, "_captured", {})
    upload = tensor_table._upload
    optimizer, params, generator, _stepped_grads = _warmed_up(backend, capturable=True)
    assert not tensor_table._captured, "an eager step keeps its tables in the evictable cache"

    capture(True)
    new_grads(generator, params)  # new grad storages, as when the captured backward allocates them
    captured_grads = [p.grad for p in params]
    optimizer.step()
    (key, table), *others = tensor_table._captured.items()
    assert not others, "one table for the group"
    on_device = torch.cat([table.pointers.flatten(), table.numels, table.chunk_offsets]).cpu()
    assert torch.equal(table.host, on_device), "the values the graph writes are the table's"
    assert key not in tensor_table._tables

    capture(False)
    uploads, alive = [], []  # (grads kept alive: a freed grad's address may come back for the next)
    monkeypatch.setattr(tensor_table, "_upload", lambda *args, **kw: uploads.append(args) or upload(*args, **kw))
    for _ in range(tensor_table._GRAD_VARIANTS + 2):  # more grads than a launch keeps tables for
        new_grads(generator, params)
        alive.append([p.grad for p in params])
        optimizer.step()
    assert len(uploads) == tensor_table._GRAD_VARIANTS + 2, "each new set of grads gets a table of its own"
    assert tensor_table._captured == {key: table}
    for param, grad in zip(params, captured_grads, strict=True):
        param.grad = grad
    optimizer.step()
    assert len(uploads) == tensor_table._GRAD_VARIANTS + 2, "the captured tensors' table was found, not rebuilt"


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] in ("triton", "cupy", "cuda-host")])
def test_a_table_made_while_capturing_is_written_by_the_first_step_outside_it(backend, capture, monkeypatch):
    """A table made while capturing has only a graph node to fill its device copy (at the first replay). The
    first step outside a capture that uses it writes it (tensor_table._unwritten; test_gpu.py checks the
    values on a GPU), and only that one."""
    # (A table with the same addresses left by an earlier test would be found, and is written: on a GPU the
    # caching allocator hands out the same addresses again. _warmed_up keeps its own step's grads.)
    monkeypatch.setattr(tensor_table, "_tables", OrderedDict())
    monkeypatch.setattr(tensor_table, "_captured", {})
    monkeypatch.setattr(tensor_table, "_unwritten", {})
    optimizer, params, generator, _stepped_grads = _warmed_up(backend, capturable=True)
    capture(True)
    new_grads(generator, params)  # allocated "inside the capture"
    optimizer.step()
    (table,) = tensor_table._captured.values()
    assert tensor_table._unwritten == {id(table): table}
    writes = []
    write = tensor_table._write_if_unwritten
    monkeypatch.setattr(tensor_table, "_write_if_unwritten", lambda t: writes.append(t) or write(t))
    capture(False)
    for grad in (p.grad for p in params):  # filled in place, then an eager step on them
        grad.copy_(torch.randn(grad.shape, generator=generator))
    optimizer.step()
    assert writes == [table] and not tensor_table._unwritten
    optimizer.step()
    assert writes == [table], "a written table is not written again"


class _NoHostToDeviceCopies(TorchDispatchMode):
    """Fails any op that would copy host memory onto another device: a captured graph cannot (torch refuses
    pageable memory while capturing). Run on the meta device, which stands for the GPU here. ``called``: the ops
    seen, in order."""

    def __init__(self):
        super().__init__()
        self.called = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.called.append(func)
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if "cpu" in devices and len(devices) > 1:
            raise AssertionError(f"{func} copies between {sorted(devices)}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lr", [1e-3, "tensor"])
def test_the_device_inputs_are_assembled_without_reading_host_memory(lr):
    """A captured step with a float lr: on a GPU, ``values[0] = 1e-3`` makes the number a CPU tensor and copies
    it (``lift_fresh`` then ``copy_`` here), which torch refuses while capturing. The numbers must reach the
    device as kernel arguments (fill_), and tensors from the device."""
    for device in (torch.device("meta"), torch.device(DEVICE)):
        scalars = [torch.ones((), device=device) for _ in range(3)]
        lr_value = torch.tensor(1e-3, device=device) if lr == "tensor" else lr
        with _NoHostToDeviceCopies() as ops:
            values = device_values(lr_value, device, *scalars)
        assert torch.ops.aten.lift_fresh.default not in ops.called, ops.called
        if device.type != "meta":
            assert values.tolist() == pytest.approx([1e-3, 1.0, 1.0])


def test_a_table_made_while_capturing_reads_no_host_memory_and_holds_its_values(capture, monkeypatch):
    """While capturing, a table's values go to the device as kernel arguments (tensor_table._written_by_kernels),
    exactly (64-bit addresses): from zeros, or (new grads) from a written table that differs in a few values,
    which the new one then holds (the graph reads it at every replay); an unwritten one is not copied from."""
    monkeypatch.setattr(tensor_table, "_unwritten", {})
    generator = seeded_generator("table while capturing")
    count, n_chunks = 37, 50
    host = torch.randint(1, 2**48, (count * (tensor_table.POINTERS_PER_TENSOR + 1) + count + 1,), generator=generator)
    other = host.clone()
    other[1 : tensor_table.POINTERS_PER_TENSOR * count : tensor_table.POINTERS_PER_TENSOR] += 2**20 + 7
    capture(True)
    for device in (torch.device("meta"), torch.device("cpu")):
        with _NoHostToDeviceCopies() if device.type == "meta" else torch.no_grad():
            table = tensor_table._upload(host, count, n_chunks, device)
            from_unwritten = tensor_table._upload(other, count, n_chunks, device, like=table)
            if device.type == "cpu":
                tensor_table._write_if_unwritten(table)  # an eager step (or a replay) has written it
            else:
                tensor_table._unwritten.clear()
            variant = tensor_table._upload(other, count, n_chunks, device, like=table)
        assert table.source is None and from_unwritten.source is None and variant.source is table
        if device.type == "cpu":
            for made, values in ((table, host), (from_unwritten, other), (variant, other)):
                assert made.host is values
                on_device = torch.cat([made.pointers.flatten(), made.numels, made.chunk_offsets])
                assert on_device.data_ptr() != values.data_ptr() and torch.equal(on_device, values)
