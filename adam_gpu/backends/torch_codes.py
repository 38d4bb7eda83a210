"""8-bit moment codes in whole-tensor torch ops: the nearest code by table lookup instead of a binary search.

The fp32 rule is the kernels' (adam_gpu.quantization): the nearest map entry to ``value / absmax``, the lower one on
a tie. As a function of the value it only ever steps up, and the maps hold 8 entries an octave, so in a bucket of
fp32 bit patterns 16 to an octave it steps at most once: a bucket's first code, plus one from the value where it
steps. Both are found here by the binary search itself, once per map, and checked.
"""

from __future__ import annotations

import functools

import torch

from adam_gpu.quantization import BLOCK, code_maps_on

KEY_SHIFT = 19  # fp32 bits >> 19: sign, exponent and 4 mantissa bits, 16 buckets an octave
_KEYS = 1 << (32 - KEY_SHIFT)
_BUCKET = 1 << KEY_SHIFT
_NEVER = float("inf")  # (a bucket where the code does not step: no value reaches it; NaN compares false too)


def code_map(signed: bool, device: torch.device) -> torch.Tensor:
    return code_maps_on(device)[0 if signed else 1]


def searched_codes(normalized: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """int64 codes of fp32 ``normalized`` by binary search in the fp32 ``code_map`` (the rule the table follows)."""
    low = (torch.searchsorted(code_map, normalized, right=True) - 1).clamp(0, code_map.numel() - 1)
    high = (low + 1).clamp(max=code_map.numel() - 1)
    nearer_high = (code_map[high] - normalized) < (normalized - code_map[low])
    return torch.where(nearer_high, high, low)


def _floats(ordered: torch.Tensor) -> torch.Tensor:
    """The fp32 values whose bit patterns are ``ordered`` (int64, in value order: -0.0 is -1, +0.0 is 0)."""
    bits = torch.where(ordered >= 0, ordered, (-ordered - 1) | (1 << 31))
    return (((bits + (1 << 31)) % (1 << 32)) - (1 << 31)).to(torch.int32).view(torch.float32)


@functools.cache
def code_table(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 first code, fp32 value where the code steps up by one) for each bucket ``(bits >> KEY_SHIFT) & 0x1FFF``
    of fp32 bit patterns, on ``device``; cached."""
    fp32_map = code_map(signed, torch.device("cpu"))
    key = torch.arange(_KEYS, dtype=torch.int64)
    positive = key < _KEYS // 2
    first_positive = key * _BUCKET  # a positive bucket's lowest value has its lowest bits, a negative one its highest
    first_negative = -(key - _KEYS // 2) * _BUCKET - _BUCKET  # in value order
    lowest = torch.where(positive, first_positive, first_negative)
    highest = lowest + _BUCKET - 1
    first, last = (searched_codes(_floats(end), fp32_map) for end in (lowest, highest))
    in_range = _floats(lowest).abs() <= 1  # (outside [-1, 1] a block's absmax is NaN: its codes are unspecified)
    steps = (last - first)[in_range & _floats(highest).abs().le(1)]
    if int(steps.max()) > 1 or int(steps.min()) < 0:
        raise AssertionError("a code map steps more than once in a bucket: KEY_SHIFT is too coarse for it")
    below, above = lowest.clone(), highest.clone()  # the code is first at below and last at above
    for _ in range(KEY_SHIFT):
        middle = (below + above) // 2
        reached = searched_codes(_floats(middle), fp32_map) >= last
        above, below = torch.where(reached, middle, above), torch.where(reached, below, middle)
    step_at = torch.where(last > first, _floats(above), _NEVER)
    return first.to(torch.uint8).to(device), step_at.to(device)


def nearest_codes(normalized: torch.Tensor, signed: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes of fp32 ``normalized`` (``value / absmax``), each exactly the binary search's, into ``out``."""
    first, step_at = code_table(signed, normalized.device)
    key = normalized.view(torch.int32).bitwise_right_shift(KEY_SHIFT).bitwise_and_(_KEYS - 1)
    stepped = normalized >= step_at.index_select(0, key)
    return torch.add(first.index_select(0, key), stepped, out=out)


def block_absmax(values: torch.Tensor) -> torch.Tensor:
    """fp32 max of |value| over each BLOCK of flat ``values`` (the last block may be short; a NaN is the max)."""
    full = values.numel() - values.numel() % BLOCK
    magnitudes = values.abs()  # (faster than aminmax on the CPU: docs/cpu-torch-backend.md)
    parts = [magnitudes[:full].view(-1, BLOCK).amax(dim=1)]
    if full < values.numel():
        parts.append(magnitudes[full:].amax().view(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _by_block(values: torch.Tensor, per_block: torch.Tensor, op: str, out: torch.Tensor) -> torch.Tensor:
    """``op`` ("mul" or "div") of flat ``values`` by one number a BLOCK, into flat ``out``."""
    full = values.numel() - values.numel() % BLOCK
    blocks = full // BLOCK
    getattr(torch, op)(values[:full].view(blocks, BLOCK), per_block[:blocks, None], out=out[:full].view(blocks, BLOCK))
    if full < values.numel():
        getattr(torch, op)(values[full:], per_block[blocks], out=out[full:])
    return out


def quantize_into(values: torch.Tensor, signed: bool, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """Write flat fp32 ``values``' codes and block absmaxes into ``codes`` (uint8) and ``absmax`` (fp32); an all-zero
    block gets absmax 0 and the code of 0. ``values`` is overwritten (with ``value / absmax``)."""
    raw = block_absmax(values)
    absmax.copy_(torch.where(raw.isfinite(), raw, float("nan")))  # a NaN/Inf in the block: NaN (quantization)
    scale = torch.where(raw > 0, raw, 1.0)  # an all-zero block: zeros
    nearest_codes(_by_block(values, scale, "div", out=values), signed, out=codes)


def dequantize_into(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, out: torch.Tensor) -> torch.Tensor:
    """Flat fp32 ``MAP[code] * absmax[block]`` of flat uint8 ``codes``, into ``out``."""
    torch.index_select(code_map(signed, codes.device), 0, codes.int(), out=out)
    return _by_block(out, absmax, "mul", out=out)
