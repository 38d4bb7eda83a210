"""Block-wise 8-bit moment storage: the code maps and a float64 model of the quantizer.

A moment tensor is stored as one uint8 code per element plus one fp32 absmax per block of BLOCK
elements: ``value = MAP[code] * absmax``, the code being the map entry nearest to ``value / absmax``.
exp_avg (signed) uses a map of sign + 4 exponent bits + 3 mantissa bits; exp_avg_sq (non-negative, and
the denominator's square) uses 5 exponent bits + 3 mantissa bits, so its smallest non-zero value is
2^-33 / 1.875 of the block's maximum: a second moment rounded to 0 beside a non-zero first moment would
divide by eps.

This module is the specification the kernels are tested against (tests/test_quantization.py,
tests/test_8bit.py); the kernels quantize inside the fused Adam step.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 256  # elements sharing one absmax
SMALL_TENSOR = 4096  # tensors with fewer elements keep full-precision moments


def _float_codes(exponent_bits: int, mantissa_bits: int) -> torch.Tensor:
    """Every non-negative value of a small float format, ascending, scaled so the largest is 1: with the
    top exponent as 2^0, value = (1 + m / 2^M) * 2^(e - top) for e >= 1 and (m / 2^M) * 2^(1 - top) for the
    subnormals (e = 0), M mantissa bits."""
    top = 2**exponent_bits - 1
    values = [
        (mantissa / 2**mantissa_bits) * 2.0 ** (1 - top)
        if exponent == 0
        else (1 + mantissa / 2**mantissa_bits) * 2.0 ** (exponent - top)
        for exponent in range(2**exponent_bits)
        for mantissa in range(2**mantissa_bits)
    ]
    codes = torch.tensor(values, dtype=torch.float64)
    return codes / codes.max()


@functools.cache
def signed_map() -> torch.Tensor:
    """256 ascending values in [-1, 1] for exp_avg: +-(4 exponent, 3 mantissa bits); 0 appears twice."""
    magnitudes = _float_codes(4, 3)  # 128 values, 0 first
    return torch.cat([-magnitudes.flip(0), magnitudes])


@functools.cache
def unsigned_map() -> torch.Tensor:
    """256 ascending values in [0, 1] for exp_avg_sq: 5 exponent and 3 mantissa bits."""
    return _float_codes(5, 3)


def quantize(values: torch.Tensor, code_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 model: (uint8 codes, fp32 absmax per block) of a flat tensor; the code is the nearest map
    entry to value / absmax (the lower one on an exact tie). An all-zero block gets absmax 0 and the
    code of 0. A block holding a NaN or an Inf gets absmax NaN, so that all of it reads NaN from then on:
    no code holds a non-finite value, and NaN must not vanish into a code (its codes are unspecified)."""
    flat = values.detach().to(torch.float64).flatten()
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK))
    blocks = padded.view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).to(torch.float32)
    scale = absmax.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    absmax = torch.where(absmax.isfinite(), absmax, float("nan"))
    normalized = (blocks / scale[:, None]).flatten()[: flat.numel()]
    upper = torch.searchsorted(code_map, normalized).clamp(1, code_map.numel() - 1)
    lower = upper - 1
    nearer_upper = (code_map[upper] - normalized) < (normalized - code_map[lower])
    codes = torch.where(nearer_upper, upper, lower).to(torch.uint8)
    return codes.view(values.shape), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """float64 values ``MAP[code] * absmax[block]`` in the codes' shape."""
    flat = codes.flatten().to(torch.int64)
    block_of = torch.arange(flat.numel(), device=codes.device) // BLOCK
    return (code_map.to(codes.device)[flat] * absmax.to(torch.float64)[block_of]).view(codes.shape)


@functools.cache
def code_maps_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two maps (signed, unsigned) in fp32 on ``device``, as the kernels read them; cached, so the
    tensors stay alive while kernels hold their addresses."""
    return tuple(code_map().to(device=device, dtype=torch.float32) for code_map in (signed_map, unsigned_map))
