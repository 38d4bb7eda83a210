"""The torch backend's CPU step where torch's fused kernel cannot take the tensors as they are: 16-bit params with
fp32 moments or fp32/lean masters, moments in another dtype than the param, 8-bit moments.

The step still goes through the fused kernel, on fp32 working chunks: a slice of each param (its master where it
has one), grad and moment is made fp32 in a reused buffer (the tensor itself where it already is fp32), stepped,
and written back (rounded, split into bf16 and remainder, or quantized) while it is still in cache. Whole-tensor
passes instead cost one trip through memory each, and a fresh allocation each (docs/cpu-torch-backend.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from adam_gpu.backends.layout import contiguous_stand_ins
from adam_gpu.backends.lean_master import joined, split
from adam_gpu.backends.torch_codes import dequantize_into, quantize_into
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.step_tensors import GRAD, StepTensors, TensorRow
from adam_gpu.storage_formats import MOMENT_DTYPES, SCALE_BLOCK, MomentFormat, master_of, scaled_format

# Elements in one working chunk, per torch thread (a multiple of SCALE_BLOCK): each op of a chunk is split over the
# threads, and each thread's share stays in its core's cache (docs/cpu-torch-backend.md).
CHUNK_PER_THREAD = 1 << 16
# torch's fused CPU kernels, Adam and AdamW (by ``decoupled``); None where this torch lacks one.
FUSED_CPU = {False: getattr(torch, "_fused_adam_", None), True: getattr(torch, "_fused_adamw_", None)}
_STORED = (torch.float32, torch.float16, torch.bfloat16)  # what becomes fp32 exactly (float64 keeps its precision)
_MOMENT_DTYPES = frozenset({*_STORED, *MOMENT_DTYPES})
_FP32_ROLES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class _Piece(NamedTuple):
    row: int
    start: int
    stop: int
    offset: int  # where its working values lie in the chunk's buffers


def applies(tensors: StepTensors, hp: AdamHyperparameters) -> bool:
    """Whether these CPU tensors can be stepped here: every value fp32, fp16, bf16 or codes of one scaled format
    (float64 is left to the foreach path, which keeps it)."""
    if FUSED_CPU[hp.decoupled] is None or tensors.device.type != "cpu":
        return False
    rows = tensors.per_tensor()
    for row in rows:
        param, grad, exp_avg, exp_avg_sq, maximum, master, *_ = row
        if any(t.dtype not in _STORED for t in (param, grad) if t is not None):
            return False
        if any(t is not None and t.dtype not in _MOMENT_DTYPES for t in (exp_avg, exp_avg_sq, maximum)):
            return False
        if master is not None and master_of(master.dtype) is None:
            return False
    scaled = _scaled_formats(rows)
    return None not in scaled and len(scaled) <= 1  # (one scaled format's codes: _CodeBuffers)


def chunked_step(tensors: StepTensors, steps: Sequence[float], hp: AdamHyperparameters) -> None:
    """One Adam/AdamW step of ``tensors`` (``applies``) through torch's fused CPU kernel, chunk_elements() at a
    time."""
    with contextlib.ExitStack() as stack:
        stand_ins = [stack.enter_context(contiguous_stand_ins(row, (GRAD,))) for row in tensors.per_tensor()]
        rows = [TensorRow(*(None if t is None else t.view(-1) for t in row)) for row in stand_ins]
        counts = {step: torch.tensor(float(step)) for step in set(steps)}  # (the kernel reads each count's value)
        size = chunk_elements()
        buffers = {role: torch.empty(size) for role in _FP32_ROLES}
        scaled = _scaled_formats(rows)
        codes = _CodeBuffers(size, scaled.pop()) if scaled else None
        for chunk in _chunks([row.param.numel() for row in rows], size):
            quantized = [_quantized_pieces(rows, chunk, moment) for moment in _QUANTIZED]
            for pieces, moment, signed in zip(quantized, _QUANTIZED, (True, False), strict=True):
                if pieces:  # (first: the buffer's other pieces are then loaded over what it leaves there)
                    codes.dequantize(rows, pieces, moment, signed, buffers[moment])
            working = [_working(rows[piece.row], piece, buffers) for piece in chunk]
            params, grads, exp_avgs, exp_avg_sqs, maxima = map(list, zip(*working, strict=True))
            FUSED_CPU[hp.decoupled](
                params, grads, exp_avgs, exp_avg_sqs, maxima if hp.amsgrad else [],
                [counts[steps[piece.row]] for piece in chunk],
                amsgrad=hp.amsgrad, lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay,
                eps=hp.eps, maximize=hp.maximize,
            )  # fmt: skip
            if hp.amsgrad:
                torch._foreach_maximum_(maxima, exp_avg_sqs)  # (NaN where the second moment is NaN: torch.py)
            for piece, values in zip(chunk, working, strict=True):
                _write_back(rows[piece.row], piece, values)
            for pieces, moment, signed in zip(quantized, _QUANTIZED, (True, False), strict=True):
                if pieces:  # (last: quantizing overwrites the whole buffer)
                    codes.quantize(rows, pieces, moment, signed, buffers[moment])


def chunk_elements() -> int:
    return CHUNK_PER_THREAD * torch.get_num_threads()


def _chunks(numels: Sequence[int], size: int) -> Iterator[list[_Piece]]:
    """Pieces of at most ``size`` elements, each starting at a multiple of ``size`` in its tensor, gathered into
    chunks of at most ``size`` elements in all (many small tensors share one); each piece's working values start at
    a multiple of SCALE_BLOCK, so a chunk's coded moments are quantized in one pass over whole blocks."""
    chunk, filled = [], 0
    for row, numel in enumerate(numels):
        for start in range(0, numel, size):
            stop = min(start + size, numel)
            if filled + stop - start > size:
                yield chunk
                chunk, filled = [], 0
            chunk.append(_Piece(row, start, stop, filled))
            filled += _whole_blocks(stop - start)
    if chunk:
        yield chunk


_QUANTIZED = ("exp_avg", "exp_avg_sq")  # the moments that may be 8-bit (signed, unsigned)


def _quantized_pieces(rows: Sequence[TensorRow], chunk: Sequence[_Piece], moment: str) -> list[_Piece]:
    return [piece for piece in chunk if getattr(rows[piece.row], f"{moment}_absmax") is not None]


def _scaled_formats(rows: Sequence[TensorRow]) -> set[MomentFormat | None]:
    """The scaled moment formats of these rows' moments that have scales (None: a dtype no such format stores)."""
    return {scaled_format(row.exp_avg.dtype) for row in rows if row.exp_avg_absmax is not None}


def _blocks(absmax: torch.Tensor, piece: _Piece, block: int) -> torch.Tensor:
    return absmax[piece.start // block : -(-piece.stop // block)]


def _in_buffer(buffer: torch.Tensor, piece: _Piece, per: int = 1) -> torch.Tensor:
    """The piece's part of a chunk's buffer (``per`` elements to one buffer entry: the block, for scales)."""
    return buffer[piece.offset // per : (piece.offset + piece.stop - piece.start + per - 1) // per]


class _CodeBuffers:
    """A chunk's codes and scales (of one scaled format: 8-bit codes and absmaxes), gathered from its pieces so that
    the codes are made in whole-chunk passes (a pass per piece costs about as much in op overhead as the pass
    itself, at 2^14 elements)."""

    def __init__(self, size: int, fmt: MomentFormat) -> None:
        self.block = fmt.scale.block
        self.codes = torch.empty(size, dtype=fmt.dtype)
        self.absmax = torch.empty(size // self.block, dtype=fmt.scale.dtype)

    def dequantize(
        self, rows: Sequence[TensorRow], pieces: Sequence[_Piece], moment: str, signed: bool, out: torch.Tensor
    ) -> None:
        for piece in pieces:
            row = rows[piece.row]
            _in_buffer(self.codes, piece).copy_(getattr(row, moment)[piece.start : piece.stop])
            scales = _blocks(getattr(row, f"{moment}_absmax"), piece, self.block)
            _in_buffer(self.absmax, piece, self.block).copy_(scales)
        used = _used(pieces)
        dequantize_into(self.codes[:used], self.absmax[: used // self.block], signed, out[:used])

    def quantize(
        self, rows: Sequence[TensorRow], pieces: Sequence[_Piece], moment: str, signed: bool, values: torch.Tensor
    ) -> None:
        for piece in pieces:  # (a short last block is padded with zeros, as the format's model pads it)
            length = piece.stop - piece.start
            values[piece.offset + length : piece.offset + _whole_blocks(length)].zero_()
        used = _used(pieces)
        quantize_into(values[:used], signed, self.codes[:used], self.absmax[: used // self.block])
        for piece in pieces:
            row = rows[piece.row]
            getattr(row, moment)[piece.start : piece.stop].copy_(_in_buffer(self.codes, piece))
            scales = _blocks(getattr(row, f"{moment}_absmax"), piece, self.block)
            scales.copy_(_in_buffer(self.absmax, piece, self.block))


def _whole_blocks(numel: int) -> int:
    return -(-numel // SCALE_BLOCK) * SCALE_BLOCK


def _used(pieces: Sequence[_Piece]) -> int:
    """How much of a chunk's buffers its pieces span, in whole blocks."""
    return _whole_blocks(pieces[-1].offset + pieces[-1].stop - pieces[-1].start)


def _fp32(tensor: torch.Tensor, piece: _Piece, buffer: torch.Tensor) -> torch.Tensor:
    """The piece of ``tensor`` in fp32: its own memory where it is fp32 (and not lazily negated), else a copy."""
    part = tensor[piece.start : piece.stop]
    if part.dtype == torch.float32 and not part.is_neg():
        return part
    return _in_buffer(buffer, piece).copy_(part)


def _moment(
    moment: torch.Tensor | None, absmax: torch.Tensor | None, piece: _Piece, buffer: torch.Tensor
) -> torch.Tensor | None:
    """The piece of a moment in fp32 (an 8-bit one: where _CodeBuffers.dequantize left it)."""
    if moment is None:
        return None
    return _fp32(moment, piece, buffer) if absmax is None else _in_buffer(buffer, piece)


def _working(row: TensorRow, piece: _Piece, buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq) of the piece, fp32; the param is its master where it has
    one (a lean master put together from the bf16 param and its remainder)."""
    if row.master is not None and master_of(row.master.dtype).splits_param:
        part = slice(piece.start, piece.stop)
        param = joined(row.param[part], row.master[part], out=_in_buffer(buffers["param"], piece))
    else:
        param = _fp32(row.param if row.master is None else row.master, piece, buffers["param"])
    return (
        param,
        _fp32(row.grad, piece, buffers["grad"]),
        _moment(row.exp_avg, row.exp_avg_absmax, piece, buffers["exp_avg"]),
        _moment(row.exp_avg_sq, row.exp_avg_sq_absmax, piece, buffers["exp_avg_sq"]),
        _moment(row.max_exp_avg_sq, None, piece, buffers["max_exp_avg_sq"]),
    )


def _write_back(row: TensorRow, piece: _Piece, values: tuple[torch.Tensor | None, ...]) -> None:
    """Store the stepped working values where they are not the tensors' own memory (8-bit moments: _CodeBuffers)."""
    part = slice(piece.start, piece.stop)
    param, _, exp_avg, exp_avg_sq, maximum = values
    if row.master is not None and master_of(row.master.dtype).splits_param:
        split(param, row.master.dtype, row.param[part], row.master[part])
    elif row.master is not None:
        row.param[part].copy_(param)
    elif param.data_ptr() != row.param[part].data_ptr():
        row.param[part].copy_(param)
    for moment, absmax, value in (
        (row.exp_avg, row.exp_avg_absmax, exp_avg),
        (row.exp_avg_sq, row.exp_avg_sq_absmax, exp_avg_sq),
        (row.max_exp_avg_sq, None, maximum),
    ):
        if moment is not None and absmax is None and value.data_ptr() != moment[part].data_ptr():
            moment[part].copy_(value)
