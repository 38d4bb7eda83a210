"""The tensors of one Adam step, and the checks that make them safe to hand to a kernel."""

from __future__ import annotations

import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from adam_gpu import storage_formats
from adam_gpu.storage_formats import EIGHT_BIT_MOMENTS, MOMENT_DTYPES, SCALED_FORMATS, master_of, scaled_format

# A feature a backend may lack (its module's FEATURES lists those it has; adam_gpu.dispatch checks them).
EIGHT_BIT = EIGHT_BIT_MOMENTS.feature

# Param dtypes the kernels read and write; math is fp32 whatever the storage.
KERNEL_DTYPES = storage_formats.PARAM_DTYPES


@dataclass
class LaunchMemo:
    """Where the backends keep what they derive from a step's tensors' addresses, dtypes, shapes and layouts. A
    caller passes the same memo again only with tensors alike in all of these, but for the grads, which may be
    other tensors of the same dtypes, shapes and strides (so contiguous where those were) lying outside the memory
    the step writes (their addresses are read every step): FusedAdam does, while adam_gpu.step_signature proves it."""

    # adam_gpu.backends.tensor_table's launches (their tables), by (chunk, amsgrad, device step counts).
    launches: dict[tuple[int, bool, bool], list] = field(default_factory=dict)
    largest_numel: int | None = None  # the most elements of one param (the Triton launcher's interpreter config)
    fused_cpu: bool | None = None  # whether torch's fused CPU kernel steps them (the torch backend's choice)
    contiguous: bool | None = None  # whether every tensor is contiguous (grads' strides are alike: TensorGuards)
    # The torch backend's amsgrad second pass: (max_exp_avg_sqs, exp_avg_sqs) or views of their ends.
    amsgrad_tails: tuple[list, list] | None = None


class TensorRow(NamedTuple):
    """One param's tensors in a step (StepTensors.per_tensor), None where it has no such part."""

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None
    master: torch.Tensor | None
    exp_avg_absmax: torch.Tensor | None
    exp_avg_sq_absmax: torch.Tensor | None


@dataclass
class StepTensors:
    """Parallel lists: ``params[i]`` is updated from ``grads[i]`` with moments ``exp_avgs[i]``, ...

    ``max_exp_avg_sqs`` is empty unless the step uses amsgrad. ``masters`` is empty, or holds for each
    param its fp32 master copy, its int16 remainder (bf16 params: the lean master, see storage_formats.MASTER_MODES) or
    None.
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    exp_avgs: Sequence[torch.Tensor]
    exp_avg_sqs: Sequence[torch.Tensor]
    max_exp_avg_sqs: Sequence[torch.Tensor] = field(default_factory=list)
    masters: Sequence[torch.Tensor | None] = field(default_factory=list)
    # Moments stored as codes (a storage_formats.SCALED_FORMATS entry, 8-bit say): exp_avgs/exp_avg_sqs hold the
    # codes and these the scale of each block (None for a tensor whose moments are plain).
    exp_avg_absmaxes: Sequence[torch.Tensor | None] = field(default_factory=list)
    exp_avg_sq_absmaxes: Sequence[torch.Tensor | None] = field(default_factory=list)
    # What the backends derived from tensors alike to these at an earlier step, and keep here for the next (None:
    # derive everything anew). See LaunchMemo for what a caller must prove to pass the same one again.
    memo: LaunchMemo | None = field(default=None, compare=False)
    # The grads' data_ptr()s, where the caller has read them this step (step_signature.reused); else None.
    grad_pointers: tuple[int, ...] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {p.dtype for p in self.params}

    @property
    def features(self) -> set[str]:
        """The optional capabilities (adam_gpu.dispatch) a backend needs for these tensors: those of the scaled
        moment formats among them."""
        if all(a is None for a in self.exp_avg_absmaxes):
            return set()
        return storage_formats.moment_features(scaled_format(m.dtype) for m in self.exp_avgs)

    @property
    def converted_state(self) -> bool:
        """Whether a param has a master, or moments (not 8-bit) in another dtype than its own (dispatch.step_kinds)."""
        if any(master is not None for master in self.masters):
            return True
        return any(m.dtype not in (p.dtype, torch.uint8) for p, m in zip(self.params, self.exp_avgs, strict=True))

    def lists(self) -> tuple[Sequence[torch.Tensor | None], ...]:
        """Every list, in the order of the fields (``StepTensors(*lists)`` rebuilds them, without the memo)."""
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.masters,
                self.exp_avg_absmaxes, self.exp_avg_sq_absmaxes)  # fmt: skip

    def per_tensor(self) -> list[TensorRow]:
        """Each param's tensors (a TensorRow), None where a tensor has no such part."""
        none = [None] * len(self.params)
        optional = (self.max_exp_avg_sqs, self.masters, self.exp_avg_absmaxes, self.exp_avg_sq_absmaxes)
        lists = (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, *(o or none for o in optional))
        return list(map(TensorRow._make, zip(*lists, strict=True)))

    def check(self, amsgrad: bool) -> WrittenSpans:
        """Raise TypeError/ValueError naming the first tensor a kernel must not be given; else return the memory
        the step writes (``WrittenSpans.aliased_grads`` then tells the grads to read from copies)."""
        lists = {"grads": self.grads, "exp_avgs": self.exp_avgs, "exp_avg_sqs": self.exp_avg_sqs}
        if amsgrad:
            lists["max_exp_avg_sqs"] = self.max_exp_avg_sqs
        for name, tensors in lists.items():
            if len(tensors) != len(self.params):
                raise ValueError(f"{len(self.params)} params but {len(tensors)} {name}")
        for name, optional in (("masters", self.masters), ("exp_avg_absmaxes", self.exp_avg_absmaxes),
                               ("exp_avg_sq_absmaxes", self.exp_avg_sq_absmaxes)):  # fmt: skip
            if optional and len(optional) != len(self.params):
                raise ValueError(f"{len(self.params)} params but {len(optional)} {name}")
        for index, tensors in enumerate(self.per_tensor()):
            if not amsgrad:
                tensors = (*tensors[:4], None, *tensors[5:])
            check_param_tensors(index, *tensors)
        check_one_device(t for row in self.per_tensor() for t in row if t is not None)
        named = self.written()
        return WrittenSpans.of(check_disjoint(named), len(named))

    def copy_grads(self, indices: Sequence[int]) -> None:
        """Give the step copies of these grads to read (grads are never written, and are read as they were
        before the step wrote anything: WrittenSpans.aliased_grads)."""
        if indices:
            grads = list(self.grads)
            for index in indices:
                grads[index] = grads[index].clone(memory_format=torch.contiguous_format)
            self.grads, self.grad_pointers = grads, None

    def written(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor the step writes, named as the errors name them."""
        named = []
        for index, (param, _, *state) in enumerate(self.per_tensor()):
            named.append((f"param {index}", param))
            roles = zip(STATE_ROLES, state, strict=True)
            named += [(f"optimizer state {index} ({role})", t) for role, t in roles if t is not None]
        return named


GRAD = TensorRow._fields.index("grad")  # the grad's place in a TensorRow
# The roles of the tensors after param and grad in StepTensors.per_tensor(), as errors name them.
STATE_ROLES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master", "exp_avg absmax", "exp_avg_sq absmax")


def check_param_tensors(
    index: int,
    param: object,
    grad: object,
    exp_avg: object,
    exp_avg_sq: object,
    max_exp_avg_sq: object = None,
    master: object = None,
    exp_avg_absmax: object = None,
    exp_avg_sq_absmax: object = None,
) -> None:
    """Every check of one param's tensors (None: a tensor the step does not use), naming the first bad one:
    what a kernel reads and writes must have the param's numel and shape, a dtype it stores, one dtype for the
    moments, and a layout it can write."""
    check_param(param, index)
    check_grad(param, grad, index)
    moments = [m for m in (exp_avg, exp_avg_sq, max_exp_avg_sq) if m is not None]
    for moment, absmax in zip(moments, (exp_avg_absmax, exp_avg_sq_absmax, None), strict=False):
        check_moment(param, moment, index, absmax)
    dtypes = {m.dtype for m in moments}
    if len(dtypes) > 1:
        roles = zip(STATE_ROLES, (exp_avg, exp_avg_sq, max_exp_avg_sq), strict=False)
        names = ", ".join(f"{role} {m.dtype}" for role, m in roles if m is not None)
        raise TypeError(f"optimizer state {index} mixes moment dtypes ({names}): a param's moments share one dtype")
    if dtypes and not dtypes <= {param.dtype, *MOMENT_DTYPES}:
        raise TypeError(
            f"optimizer state {index} has dtype {dtypes.pop()}: the moments of a {param.dtype} param are stored in "
            f"{_MOMENT_STORAGE}"
        )
    check_master(param, master, index)
    written = zip(("param", *STATE_ROLES), (param, exp_avg, exp_avg_sq, max_exp_avg_sq, master, exp_avg_absmax,
                                             exp_avg_sq_absmax), strict=True)  # fmt: skip
    for what, tensor in written:
        if tensor is not None:
            check_writable(tensor, what, index)


def _storage_text() -> str:
    """How moments may be stored, as check_param_tensors says it: "its dtype, float32 or bfloat16 (or as 8-bit
    codes)"."""
    formats = storage_formats.MOMENT_FORMATS
    plain = ["its dtype", *(str(f.dtype).removeprefix("torch.") for f in formats if f.dtype and not f.scale)]
    codes = " or ".join(f"{f.name} codes" for f in SCALED_FORMATS)
    return f"{', '.join(plain[:-1])} or {plain[-1]}" + (f" (or as {codes})" if codes else "")


_MOMENT_STORAGE = _storage_text()


def check_writable(tensor: torch.Tensor, what: str, index: int) -> None:
    """A tensor the step writes must not have elements that share memory (an expanded tensor): no write could
    give each element its own value (torch's in-place ops refuse it too)."""
    if not tensor.is_contiguous() and torch._debug_has_internal_overlap(tensor) == 1:
        raise ValueError(
            f"{what} {index} has elements that share memory (strides {tensor.stride()}, an expanded tensor?): "
            "the step cannot write it; use a dense tensor (.contiguous())"
        )


def memory_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` that ``tensor``'s elements lie in (every stride is non-negative in torch)."""
    start = tensor.data_ptr()
    if tensor.is_contiguous():
        return start, start + tensor.numel() * tensor.element_size()
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + (last + 1) * tensor.element_size()


def check_disjoint(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[int, int]]:
    """No two tensors a step writes may share memory (a moment put in as another's, a param listed twice, two
    views of one buffer that overlap): the step would write one with the other's values. Returns their memory
    spans (``[start, end)`` bytes), sorted (and so disjoint but for interleaved views)."""
    spans = sorted((*memory_span(t), index) for index, (_, t) in enumerate(named) if t.numel())
    end, last = -1, -1
    for start, next_end, index in spans:
        if start < end and _share_elements(named[last][1], named[index][1]):
            name, other = named[last][0], named[index][0]
            raise ValueError(
                f"{name} and {other} share memory: a step writes each of them, so neither could get its own "
                "values (give each its own tensor)"
            )
        if next_end > end:
            end, last = next_end, index
    return [(start, end) for start, end, _ in spans]


def int64_tensor(values: Sequence[int]) -> torch.Tensor:
    """``values`` (addresses, sizes) as an int64 host tensor, through an ``array`` buffer (faster than
    ``torch.tensor`` on a tuple of Python ints)."""
    return (
        torch.frombuffer(array.array("q", values), dtype=torch.int64) if values else torch.empty(0, dtype=torch.int64)
    )


def overlapping(written: WrittenSpans, starts: torch.Tensor, nbytes: torch.Tensor) -> torch.Tensor:
    """Which of the spans ``[starts, starts + nbytes)`` (int64 tensors on the host) overlap ``written``'s."""
    ends = starts + nbytes
    below = torch.searchsorted(written.starts, ends)  # the written spans that start before each one ends
    return (below > 0) & (written.ends_so_far[below.clamp(min=1) - 1] > starts)


@dataclass(frozen=True)
class WrittenSpans:
    """The memory a step writes (StepTensors.written): sorted span starts, and for each the largest end of the
    spans up to it (int64 tensors on the host), to find at once which grads lie in it (``overlapping``)."""

    starts: torch.Tensor
    ends_so_far: torch.Tensor
    count: int  # of the tensors written (those of no elements included)

    @classmethod
    def of(cls, spans: Sequence[tuple[int, int]], count: int | None = None) -> WrittenSpans:
        """From sorted spans, of ``count`` tensors (default: one a span)."""
        table = torch.tensor(spans or [(0, 0)], dtype=torch.int64).view(-1, 2)
        return cls(
            table[:, 0].contiguous(), torch.cummax(table[:, 1], dim=0).values, len(spans) if count is None else count
        )

    def aliased_grads(self, grads: Sequence[torch.Tensor]) -> list[int]:
        """The indices of ``grads`` whose memory the step writes (a grad that is a view of a param, say): they
        must be read from copies, or a kernel would read values the same step has written."""
        starts = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
        nbytes = torch.tensor([memory_span(g)[1] - memory_span(g)[0] for g in grads], dtype=torch.int64)
        return overlapping(self, starts, nbytes).nonzero().flatten().tolist()


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors whose spans overlap have an element in common: only strided views of one storage
    with one element size (two columns of a matrix, say) can interleave without sharing one."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    if a.element_size() != b.element_size() or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return True  # (views of other element sizes: told apart no further)
    size = a.element_size()
    low = min(memory_span(a)[0], memory_span(b)[0])
    high = max(memory_span(a)[1], memory_span(b)[1])
    elements = torch.arange((high - low) // size, device=a.device)  # (the elements of both spans, no more)

    def offsets(t: torch.Tensor) -> torch.Tensor:
        return elements.as_strided(t.shape, t.stride(), (t.data_ptr() - low) // size).flatten()

    return bool(torch.isin(offsets(a), offsets(b)).any())


def check_step_count(step: object, what: str) -> None:
    """A step count as torch.optim keeps it: a 1-element tensor (torch's layout) of a real dtype (float32 as torch
    creates it, or any float or integer dtype a user or an older checkpoint put there). ``what`` names it."""
    valid = isinstance(step, torch.Tensor) and step.layout == torch.strided and not step.is_nested
    if not valid or step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
        raise TypeError(f"{what} must be a 1-element tensor of a real dtype (torch.optim's layout), got {step!r:.80}")


def master_mode(param: torch.Tensor, master: torch.Tensor | None) -> int:
    """The kernels' master mode (adam_gpu.kernel_abi.Master) of a param's master (None: none), by its dtype."""
    return master_of(None if master is None else master.dtype).kernel.value


def check_master(param: torch.Tensor, master: object, index: int) -> None:
    if master is None:
        return
    mode = master_of(master.dtype) if isinstance(master, torch.Tensor) else None
    if mode is None:
        kinds = " or ".join(m.description for m in storage_formats.STORED_MASTERS)
        raise TypeError(f"master {index} must be {kinds}, got {master!r:.80}")
    if master.layout != torch.strided or master.is_nested:
        raise TypeError(f"master {index} has layout {master.layout}: masters must be dense")
    if master.shape != param.shape:
        raise ValueError(f"master {index} has shape {tuple(master.shape)} but its param {tuple(param.shape)}")
    if not mode.holds(param.dtype):
        names = " and ".join(str(d).removeprefix("torch.") for d in mode.param_dtypes)
        raise TypeError(f"master {index} is {mode.description} ({master.dtype}), which only {names} params have, "
                        f"not {param.dtype}")  # fmt: skip


def check_one_device(tensors: Iterable[torch.Tensor]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"the tensors of one step (one param group) must be on one device, found {names}")


def check_param(param: object, index: int) -> None:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param {index} is a {type(param).__name__}, not a torch.Tensor")
    if param.is_complex() or not param.is_floating_point():
        raise TypeError(
            f"param {index} has dtype {param.dtype}: adam-gpu updates real floating-point params "
            "(float32, float16, bfloat16; float64 through the torch backend)"
        )
    if param.layout != torch.strided or param.is_nested:
        kind = "nested" if param.is_nested else param.layout
        raise TypeError(f"param {index} has layout {kind}: only dense (strided) params are supported")


def check_grad(param: torch.Tensor, grad: object, index: int) -> None:
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad {index} is a {type(grad).__name__}, not a torch.Tensor")
    if grad.is_sparse or grad.layout != torch.strided:
        raise TypeError(
            f"grad {index} is sparse ({grad.layout}): adam-gpu does not support sparse gradients, "
            "consider torch.optim.SparseAdam"
        )
    if grad.is_complex():
        raise TypeError(f"grad {index} is complex ({grad.dtype}): adam-gpu does not support complex gradients")
    if grad.dtype != param.dtype:
        raise TypeError(f"grad {index} has dtype {grad.dtype} but its param has dtype {param.dtype}")
    if grad.shape != param.shape:
        raise ValueError(f"grad {index} has shape {tuple(grad.shape)} but its param has shape {tuple(param.shape)}")


def check_moment(param: torch.Tensor, moment: object, index: int, absmax: object = None) -> None:
    if not isinstance(moment, torch.Tensor):
        raise TypeError(f"optimizer state {index} is a {type(moment).__name__}, not a torch.Tensor")
    if moment.is_nested:  # (it has no shape to compare: torch raises an internal error on .shape)
        raise TypeError(f"optimizer state {index} is a nested tensor: moments must be dense")
    if moment.shape != param.shape:
        raise ValueError(
            f"optimizer state {index} has shape {tuple(moment.shape)} but its param has shape {tuple(param.shape)}"
        )
    fmt = scaled_format(moment.dtype)
    if fmt is not None:  # codes: their blocks' scales must come with them
        blocks, scale = fmt.scale.blocks(moment.numel()), fmt.scale
        fits = isinstance(absmax, torch.Tensor) and absmax.dtype == scale.dtype and not absmax.is_nested
        if not fits or absmax.numel() != blocks or absmax.layout != torch.strided:
            raise ValueError(f"{fmt.name} optimizer state {index} needs {scale.description} of {blocks} blocks, "
                             f"got {absmax!r}")  # fmt: skip
        return
    if moment.is_complex() or not moment.is_floating_point() or moment.layout != torch.strided:
        raise TypeError(f"optimizer state {index} has dtype {moment.dtype}: moments must be dense floating point")
