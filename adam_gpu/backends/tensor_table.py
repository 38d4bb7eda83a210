"""The device-side table a multi-tensor launch reads: one launch updates every tensor of a group.

For each launch the kernels get three small int64 tensors on the device: ``pointers`` [T, 9] (param,
grad, exp_avg, exp_avg_sq, max_exp_avg_sq, the step count when it lives on the device, the master copy
or lean remainder when there is one, and the absmax of 8-bit exp_avg and exp_avg_sq), ``numels``
[T] and ``chunk_offsets`` [T + 1] (the first chunk of each tensor; a chunk is ``chunk`` consecutive
elements of one tensor). A program (Triton) or a block iteration (CUDA C) takes one chunk and finds
its tensor by binary search in ``chunk_offsets``.
Tables are cached by the tensors' addresses and sizes, so a training loop builds them once; they are
rebuilt only when a storage moves (a new grad tensor after ``zero_grad(set_to_none=True)``, say).

Under CUDA graph capture (a whole training step captured, grads allocated inside it) a table may be built
while capturing: its host-to-device copy is then a node of the graph that re-reads the host tensor at every
replay. So each table keeps its host tensor, and a table built or used during a capture is never evicted
(the graph reads it for as long as the graph exists; a few KB a table).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from adam_gpu.backends.layout import contiguous_stand_ins
from adam_gpu.device_inputs import is_capturing
from adam_gpu.hyperparameters import AdamHyperparameters, StepScalars
from adam_gpu.step_tensors import StepTensors, master_mode

POINTERS_PER_TENSOR = 9
# Tables kept per process (least recently used evicted): one or two per param group and dtype policy, so a
# model with hundreds of groups (layer-wise learning rates) still builds each once; 1024 GPT-2-sized tables
# hold 12 MB of device memory.
_CACHE_SIZE = 1024


@dataclass(frozen=True)
class TensorTable:
    pointers: torch.Tensor  # int64 [T, 9] on the tensors' device
    numels: torch.Tensor  # int64 [T]
    chunk_offsets: torch.Tensor  # int64 [T + 1]
    n_tensors: int
    n_chunks: int
    host: torch.Tensor  # pointers, numels and chunk offsets on the host: what a captured graph copies from


@dataclass(frozen=True)
class LaunchGroup:
    """Tensors that one launch updates: same param dtype, moment dtype, master mode (step_tensors.MASTER_MODES)
    and (for host step counts) step."""

    param_dtype: torch.dtype
    state_dtype: torch.dtype
    master_mode: int
    scalars: StepScalars
    table: TensorTable


_tables: OrderedDict[tuple, TensorTable] = OrderedDict()
_captured: dict[tuple, TensorTable] = {}  # tables a CUDA graph reads: never evicted


def _table(
    rows: list[tuple[int, ...]], numels: list[int], chunk: int, device: torch.device
) -> tuple[tuple, TensorTable]:
    """The table of these rows and its cache key."""
    key = (device, chunk, tuple(rows), tuple(numels))
    table = _captured.get(key) or _tables.get(key)
    if table is None:
        chunks = [-(-n // chunk) for n in numels]
        host = torch.tensor(
            [value for row in rows for value in row] + numels + [0, *itertools.accumulate(chunks)], dtype=torch.int64
        )
        on_device = host.to(device, non_blocking=True) if device.type == "cuda" else host
        count = len(numels)
        table = TensorTable(
            pointers=on_device[: POINTERS_PER_TENSOR * count].view(count, POINTERS_PER_TENSOR),
            numels=on_device[POINTERS_PER_TENSOR * count : POINTERS_PER_TENSOR * count + count],
            chunk_offsets=on_device[POINTERS_PER_TENSOR * count + count :],
            n_tensors=count,
            n_chunks=sum(chunks),
            host=host,
        )
        _tables[key] = table
        if len(_tables) > _CACHE_SIZE:
            _tables.popitem(last=False)
    elif key in _tables:
        _tables.move_to_end(key)
    _keep_if_captured(key, table, device)
    return key, table


def _keep_if_captured(key: tuple, table: TensorTable, device: torch.device) -> None:
    if is_capturing(device):
        _captured[key] = _tables.pop(key, table)


@contextlib.contextmanager
def launch_groups(
    tensors: StepTensors,
    steps: list[float] | None,
    hp: AdamHyperparameters,
    chunk: int,
    device_steps: Sequence[torch.Tensor] | None = None,
) -> Iterator[list[LaunchGroup]]:
    """The launches one step needs (usually one), while contiguous stand-ins of non-contiguous tensors
    exist; the stand-ins are written back when the block ends without an error.

    ``steps`` are host step counts (one launch per distinct count), or None with ``device_steps``: the
    step counts' addresses then go into the table and the kernel reads them. With ``tensors.memo``, the
    tables of a step whose tensors are contiguous and whose host step counts are equal are kept there and
    found again (1000 tensors: 3 ms of rows, grouping and table lookup saved)."""
    step_values = steps if steps is not None else [None] * len(tensors)
    one_step = not step_values or step_values.count(step_values[0]) == len(step_values)
    memo_key = ("launch tables", chunk, hp.amsgrad, device_steps is not None)
    with contextlib.ExitStack() as stack:
        tables = tensors.memo.get(memo_key) if tensors.memo is not None and one_step else None
        if tables is None:
            tables, contiguous = _launch_tables(tensors, step_values, hp, chunk, device_steps, stack)
            if tensors.memo is not None and one_step and contiguous:
                tensors.memo[memo_key] = tables
        else:  # the same tables, all for this step's count
            tables = [(*dtypes_and_mode, step_values[0], key, table) for *dtypes_and_mode, _, key, table in tables]
            for *_, key, table in tables:
                _keep_if_captured(key, table, tensors.device)
        yield [
            LaunchGroup(param_dtype, state_dtype, mode, hp.step_scalars(1.0 if step is None else step), table)
            for param_dtype, state_dtype, mode, step, _, table in tables
        ]


def _launch_tables(
    tensors: StepTensors,
    step_values: list[float] | list[None],
    hp: AdamHyperparameters,
    chunk: int,
    device_steps: Sequence[torch.Tensor] | None,
    stack: contextlib.ExitStack,
) -> tuple[list[tuple], bool]:
    """(param dtype, state dtype, master mode, step, table key, table) of each launch, and whether every
    tensor was contiguous (else the tables hold stand-ins' addresses, entered into ``stack``)."""
    groups: dict[tuple, tuple[list[tuple[int, ...]], list[int]]] = {}
    step_pointers = [s.data_ptr() for s in device_steps] if device_steps is not None else [0] * len(tensors)
    contiguous = True
    for step, step_pointer, originals in zip(step_values, step_pointers, tensors.per_tensor(), strict=True):
        numel = originals[0].numel()
        if numel == 0:
            continue
        for tensor in originals:
            if tensor is not None and not tensor.is_contiguous():
                originals = stack.enter_context(contiguous_stand_ins(originals))
                contiguous = False
                break
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, exp_avg_absmax, exp_avg_sq_absmax = originals
        maximum = max_exp_avg_sq if hp.amsgrad else exp_avg_sq  # never touched without amsgrad
        # (Written out, not looped: this runs for every tensor of a step whose tables are not memoized.)
        row = (
            param.data_ptr(),
            grad.data_ptr(),
            exp_avg.data_ptr(),
            exp_avg_sq.data_ptr(),
            maximum.data_ptr(),
            step_pointer,
            0 if master is None else master.data_ptr(),
            0 if exp_avg_absmax is None else exp_avg_absmax.data_ptr(),
            0 if exp_avg_sq_absmax is None else exp_avg_sq_absmax.data_ptr(),
        )
        key = (param.dtype, exp_avg.dtype, master_mode(param, master), step)
        rows, numels = groups.setdefault(key, ([], []))
        rows.append(row)
        numels.append(numel)
    launches = [(*key, *_table(rows, numels, chunk, tensors.device)) for key, (rows, numels) in groups.items()]
    return launches, contiguous
