"""The device-side table a multi-tensor launch reads: one launch updates every tensor of a group.

For each launch the kernels get three small int64 tensors on the device: ``pointers`` [T, ROW_WIDTH] (the
addresses of adam_gpu.kernel_abi.Column: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, the step count when it
lives on the device, the master copy or lean remainder when there is one, and the absmax of 8-bit exp_avg and
exp_avg_sq; 0 where a param has none), ``numels``
[T] and ``chunk_offsets`` [T + 1] (the first chunk of each tensor; a chunk is ``chunk`` consecutive
elements of one tensor). A program (Triton) or a block iteration (CUDA C) takes one chunk and finds
its tensor by binary search in ``chunk_offsets``.
Tables are cached by the tensors' addresses and sizes, so a training loop builds them once. New grad tensors
(``zero_grad()`` frees them, backward makes new ones) get a copy of the kept table with their addresses put in
(a tenth of the time building it from its rows takes): see launch_groups.

Under CUDA graph capture (a whole training step captured, grads allocated inside it) a table may be built
while capturing: its values are then written by kernels of the graph that carry them as arguments
(_written_by_kernels), so its device copy holds them only once the graph has been replayed (or an eager step
wrote it from the host tensor each table keeps: _write_if_unwritten). A table built or used during a capture
is never evicted (the graph reads it for as long as the graph exists; a few KB a table).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from adam_gpu.backends.layout import contiguous_stand_ins, readable
from adam_gpu.device_inputs import is_capturing
from adam_gpu.hyperparameters import AdamHyperparameters, StepScalars
from adam_gpu.kernel_abi import ROW_WIDTH, Column
from adam_gpu.step_tensors import GRAD, StepTensors, TensorRow, int64_tensor, master_mode

POINTERS_PER_TENSOR = ROW_WIDTH
_GRAD_COLUMN = int(Column.GRAD)
# Where each column of a row comes from: the TensorRow field of its name, or (None) the step count.
_ROW_SOURCES = tuple(
    None if column is Column.STEP else TensorRow._fields.index(column.name.lower()) for column in Column
)
_PARAM, _EXP_AVG, _EXP_AVG_SQ, _MAX_EXP_AVG_SQ, _MASTER = map(
    TensorRow._fields.index, ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")
)
# Tables kept per process (least recently used evicted): one or two per param group and dtype policy, so a
# model with hundreds of groups (layer-wise learning rates) still builds each once; 1024 GPT-2-sized tables
# hold 12 MB of device memory.
_CACHE_SIZE = 1024

_data_ptr = torch.Tensor.data_ptr


@dataclass(frozen=True)
class TensorTable:
    pointers: torch.Tensor  # int64 [T, ROW_WIDTH] on the tensors' device
    numels: torch.Tensor  # int64 [T]
    chunk_offsets: torch.Tensor  # int64 [T + 1]
    n_tensors: int
    n_chunks: int
    # Pointers, numels and chunk offsets on the host (an eager step writes an unwritten table from it).
    host: torch.Tensor
    # The table whose device copy a graph that made this one (while capturing) reads at every replay: held here,
    # so that it lives as long as this one does (it may leave the cache and its launch's memo).
    source: TensorTable | None = None


@dataclass(frozen=True)
class LaunchGroup:
    """Tensors that one launch updates: same param dtype, moment dtype, master mode (storage_formats.MASTER_MODES)
    and (for host step counts) step."""

    param_dtype: torch.dtype
    state_dtype: torch.dtype
    master_mode: int
    scalars: StepScalars
    table: TensorTable


_tables: OrderedDict[tuple, TensorTable] = OrderedDict()
_captured: dict[tuple, TensorTable] = {}  # tables a CUDA graph reads: never evicted
# Tables made while capturing, by id: kernels of the graph write their values (_written_by_kernels), so their
# device copy holds nothing until the graph's first replay. A step outside any capture that uses one before then (an
# eager step on the captured grads) writes it itself (_write_if_unwritten); replays write the same values.
_unwritten: dict[int, TensorTable] = {}
# Tables of other grads kept per memoized launch (_with_grads): a training loop's backward gets its new grads
# from the caching allocator, which mostly hands out the addresses the last step freed.
_GRAD_VARIANTS = 4


@dataclass(frozen=True)
class _Launch:
    """One launch of a step as built (_launch_tables) and kept in a memo (launch_groups): the positions of its
    tensors in the step's lists (its table's rows, in order), its table and the grad addresses in it, and the
    tables made from it for other grads (``variants``, by grad addresses, least recently used first)."""

    param_dtype: torch.dtype
    state_dtype: torch.dtype
    master_mode: int
    step: float | None
    indices: list[int]
    key: tuple
    table: TensorTable
    grad_pointers: tuple[int, ...]
    variants: OrderedDict[tuple[int, ...], TensorTable] = field(default_factory=OrderedDict)


def _upload(
    host: torch.Tensor, count: int, n_chunks: int, device: torch.device, like: TensorTable | None = None
) -> TensorTable:
    """The table whose pointers, numels and chunk offsets are ``host``, copied to ``device``; while capturing,
    written by kernels from ``like`` (a table that differs from it in a few values) or from zeros."""
    source = None
    if is_capturing(device):
        on_device, source = _written_by_kernels(host, device, like)
    else:
        on_device = host.to(device, non_blocking=True) if device.type == "cuda" else host
    table = TensorTable(
        pointers=on_device[: POINTERS_PER_TENSOR * count].view(count, POINTERS_PER_TENSOR),
        numels=on_device[POINTERS_PER_TENSOR * count : POINTERS_PER_TENSOR * count + count],
        chunk_offsets=on_device[POINTERS_PER_TENSOR * count + count :],
        n_tensors=count,
        n_chunks=n_chunks,
        host=host,
        source=source,
    )
    if is_capturing(device):
        _unwritten[id(table)] = table  # (kept in _captured too: its id stays its own)
    return table


def _written_by_kernels(
    host: torch.Tensor, device: torch.device, like: TensorTable | None
) -> tuple[torch.Tensor, TensorTable | None]:
    """``host`` on ``device`` without reading host memory on the device, and the table it is copied from on the
    device (None: from zeros). A graph may not copy from pageable memory (torch refuses it while capturing), nor
    allocate pinned memory (global capture mode forbids it). The values that differ from ``like``'s (a table on
    the device; else from zeros) are added by ``_foreach_add_``, which passes its scalars as kernel arguments:
    nodes of the graph that hold the values, one launch per 96 or so of them (new grads: one value a tensor)."""
    if like is None or id(like) in _unwritten:  # (an unwritten table holds its values only after a replay)
        on_device, like = torch.zeros(host.shape, dtype=host.dtype, device=device), None
        difference = host
    else:
        on_device = torch.cat([like.pointers.flatten(), like.numels, like.chunk_offsets])
        difference = host - like.host
    changed = difference.nonzero().flatten().tolist()
    if changed:
        elements = on_device.unbind()
        torch._foreach_add_([elements[index] for index in changed], difference[changed].tolist())
    return on_device, like


def _write_if_unwritten(table: TensorTable) -> None:
    """Copy a table made while capturing to the device now, if no replay may have done it (see _unwritten)."""
    if _unwritten.pop(id(table), None) is None:
        return
    count = table.n_tensors
    table.pointers.view(-1).copy_(table.host[: POINTERS_PER_TENSOR * count], non_blocking=True)
    table.numels.copy_(table.host[POINTERS_PER_TENSOR * count : POINTERS_PER_TENSOR * count + count], non_blocking=True)
    table.chunk_offsets.copy_(table.host[POINTERS_PER_TENSOR * count + count :], non_blocking=True)


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
        table = _upload(host, len(numels), sum(chunks), device)
        _tables[key] = table
        if len(_tables) > _CACHE_SIZE:
            _tables.popitem(last=False)
    elif key in _tables:
        _tables.move_to_end(key)
    _keep_if_captured(key, table, device)
    return key, table


def _with_grads(launch: _Launch, grad_pointers: tuple[int, ...], device: torch.device) -> TensorTable:
    """``launch``'s table with the grads at ``grad_pointers`` (the step's, contiguous, alike in dtype and shape to
    those it was built with): its own when they are the same, else its table with their addresses put in (a tenth
    of the time building it from its rows takes), kept among its ``variants``."""
    whole = len(launch.indices) == len(grad_pointers)  # (one launch for the step: its rows are the step's tensors)
    pointers = grad_pointers if whole else tuple(map(grad_pointers.__getitem__, launch.indices))
    if pointers == launch.grad_pointers:
        _keep_if_captured(launch.key, launch.table, device)
        return launch.table
    # (A table captured in a graph may have left the variants; it is found again in _captured.)
    table = launch.variants.get(pointers) or (_captured.get((launch.key, pointers)) if _captured else None)
    if table is None:
        host = launch.table.host.clone()
        grads = slice(_GRAD_COLUMN, POINTERS_PER_TENSOR * len(pointers), POINTERS_PER_TENSOR)
        host[grads] = int64_tensor(pointers)
        table = _upload(host, launch.table.n_tensors, launch.table.n_chunks, device, like=launch.table)
    launch.variants[pointers] = table
    launch.variants.move_to_end(pointers)
    if len(launch.variants) > _GRAD_VARIANTS:
        launch.variants.popitem(last=False)
    _keep_if_captured((launch.key, pointers), table, device)
    return table


def _keep_if_captured(key: tuple, table: TensorTable, device: torch.device) -> None:
    if is_capturing(device):
        _captured[key] = _tables.pop(key, table)


class _LaunchBlock:
    """What ``with launch_groups(...) as launches`` enters: the launches, and the stand-ins made for them (an
    ExitStack, or None where the tensors are their own)."""

    __slots__ = ("launches", "stand_ins")

    def __init__(self, launches: list[LaunchGroup], stand_ins: contextlib.ExitStack | None) -> None:
        self.launches, self.stand_ins = launches, stand_ins

    def __enter__(self) -> list[LaunchGroup]:
        return self.launches

    def __exit__(self, *error: object) -> bool:
        return self.stand_ins.__exit__(*error) if self.stand_ins is not None else False


def launch_groups(
    tensors: StepTensors,
    steps: list[float] | None,
    hp: AdamHyperparameters,
    chunk: int,
    device_steps: Sequence[torch.Tensor] | None = None,
) -> _LaunchBlock:
    """The launches one step needs (usually one), for a ``with`` block while contiguous stand-ins of
    non-contiguous tensors exist; the stand-ins are written back when the block ends without an error.

    ``steps`` are host step counts (one launch per distinct count), or None with ``device_steps``: the
    step counts' addresses then go into the table and the kernel reads them. With ``tensors.memo``, the
    launches of a step whose tensors are contiguous and whose host step counts are equal are kept there and
    found again (rows, grouping and table lookup saved), their tables given this
    step's grads (which may be new tensors, see StepTensors.memo: alike in strides, so contiguous too)."""
    step_values = steps if steps is not None else [None] * len(tensors)
    one_step = not step_values or step_values.count(step_values[0]) == len(step_values)
    memo = tensors.memo if one_step else None
    kept = memo.launches.get((chunk, hp.amsgrad, device_steps is not None)) if memo is not None else None
    stand_ins = None
    if kept is not None:  # the same launches, all for this step's count
        step = step_values[0] if step_values else None
        grad_pointers = tensors.grad_pointers or tuple(map(_data_ptr, tensors.grads))
        launches = [(launch, step, _with_grads(launch, grad_pointers, tensors.device)) for launch in kept]
    else:
        stand_ins = contextlib.ExitStack()
        try:
            built, contiguous = _launch_tables(tensors, step_values, hp, chunk, device_steps, stand_ins)
        except BaseException:
            stand_ins.close()
            raise
        if memo is not None and contiguous:
            memo.launches[chunk, hp.amsgrad, device_steps is not None] = built
        launches = [(launch, launch.step, launch.table) for launch in built]
    if _unwritten and not is_capturing(tensors.device):
        for _, _, table in launches:
            _write_if_unwritten(table)
    groups = [
        LaunchGroup(
            launch.param_dtype,
            launch.state_dtype,
            launch.master_mode,
            hp.step_scalars(1.0 if step is None else step),
            table,
        )
        for launch, step, table in launches
    ]
    return _LaunchBlock(groups, stand_ins)


def _launch_tables(
    tensors: StepTensors,
    step_values: list[float] | list[None],
    hp: AdamHyperparameters,
    chunk: int,
    device_steps: Sequence[torch.Tensor] | None,
    stack: contextlib.ExitStack,
) -> tuple[list[_Launch], bool]:
    """The launches of a step, and whether every tensor was contiguous (else the tables hold stand-ins'
    addresses, entered into ``stack``)."""
    groups: dict[tuple, tuple[list[tuple[int, ...]], list[int], list[int]]] = {}
    step_pointers = [s.data_ptr() for s in device_steps] if device_steps is not None else [0] * len(tensors)
    contiguous = True
    for index, (step, step_pointer, originals) in enumerate(
        zip(step_values, step_pointers, tensors.per_tensor(), strict=True)
    ):
        numel = originals[0].numel()
        if numel == 0:
            continue
        if originals[GRAD].is_neg() or not all(t is None or t.is_contiguous() for t in originals):
            originals = stack.enter_context(contiguous_stand_ins(originals, read_only=(GRAD,)))
            originals[GRAD] = readable(originals[GRAD])
            contiguous = False
        param, master = originals[_PARAM], originals[_MASTER]
        addresses = [0 if t is None else t.data_ptr() for t in originals]
        if not hp.amsgrad:  # (never touched without amsgrad)
            addresses[_MAX_EXP_AVG_SQ] = addresses[_EXP_AVG_SQ]
        row = tuple([step_pointer if source is None else addresses[source] for source in _ROW_SOURCES])
        key = (param.dtype, originals[_EXP_AVG].dtype, master_mode(param, master), step)
        rows, numels, indices = groups.setdefault(key, ([], [], []))
        rows.append(row)
        numels.append(numel)
        indices.append(index)
    launches = []
    for (param_dtype, state_dtype, mode, step), (rows, numels, indices) in groups.items():
        key, table = _table(rows, numels, chunk, tensors.device)
        grad_pointers = tuple(row[_GRAD_COLUMN] for row in rows)
        launches.append(_Launch(param_dtype, state_dtype, mode, step, indices, key, table, grad_pointers))
    return launches, contiguous
