"""The 8-bit moment quantizer's float64 model (adam_gpu/quantization.py): the maps and the nearest-code
rule that the fused kernels are held to; and the kernels' own code arithmetic, which reads no map: each code's
value from the code's bits, against the fp32 map; the nearest code from the value's bits, corrected, against a
binary search of the map (the rule, in the kernels' fp32)."""

from __future__ import annotations

import types

import pytest
import torch
import triton
import triton.language as tl
from support import DEVICE, seeded_generator

from adam_gpu.kernels import adam_triton
from adam_gpu.quantization import BLOCK, dequantize, quantize, signed_map, unsigned_map


def test_maps_are_ascending_and_span_their_ranges():
    signed, unsigned = signed_map(), unsigned_map()
    assert signed.shape == unsigned.shape == (256,)
    assert bool((signed[1:] >= signed[:-1]).all()) and bool((unsigned[1:] > unsigned[:-1]).all())
    assert (signed[0], signed[-1], unsigned[0], unsigned[-1]) == (-1.0, 1.0, 0.0, 1.0)
    assert 0.0 in signed
    # The smallest non-zero second moment: the smallest subnormal, 2^-33, over the largest value, 1.875.
    assert unsigned[1] == pytest.approx(2.0**-33 / 1.875)


@pytest.mark.parametrize("size", [1, 255, 256, 257, 4097, 10_007])
@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_codes_are_the_nearest_map_entries(size, name):
    code_map = signed_map() if name == "signed" else unsigned_map()
    generator = seeded_generator("quantize", size, name)
    values = torch.randn(size, generator=generator, dtype=torch.float64) * 10.0 ** torch.randint(
        -6, 3, (size,), generator=generator
    )
    if name == "unsigned":
        values = values.square()
    codes, absmax = quantize(values, code_map)
    assert codes.dtype == torch.uint8 and absmax.numel() == -(-size // BLOCK)
    blocks = torch.nn.functional.pad(values, (0, (-size) % BLOCK)).view(-1, BLOCK)
    torch.testing.assert_close(absmax, blocks.abs().amax(dim=1).float(), rtol=0, atol=0)
    # Brute force: the distance to the chosen entry is the smallest distance to any entry.
    normalized = values / absmax.double().repeat_interleave(BLOCK)[:size]
    distances = (normalized[:, None] - code_map[None, :]).abs()
    chosen = distances.gather(1, codes.long()[:, None]).squeeze(1)
    torch.testing.assert_close(chosen, distances.min(dim=1).values, rtol=0, atol=0)
    restored = dequantize(codes, absmax, code_map)
    assert restored.shape == values.shape
    torch.testing.assert_close(restored, code_map[codes.long()] * absmax.double().repeat_interleave(BLOCK)[:size])


def test_an_all_zero_block_stays_zero():
    values = torch.cat([torch.zeros(BLOCK, dtype=torch.float64), torch.ones(3, dtype=torch.float64)])
    codes, absmax = quantize(values, signed_map())
    assert absmax[0] == 0 and bool((dequantize(codes, absmax, signed_map())[:BLOCK] == 0).all())


def _searched_codes(values: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """The nearest-code rule as the kernels compute it, in fp32: the last map entry <= value by binary search
    (0 if none), then the next entry if it is strictly nearer."""
    low = torch.zeros(values.shape, dtype=torch.int64)
    high = torch.full(values.shape, code_map.numel() - 1, dtype=torch.int64)
    for _ in range(8):
        middle = (low + high + 1) // 2
        below = code_map[middle] <= values
        low, high = torch.where(below, middle, low), torch.where(below, high, middle - 1)
    upper = (low + 1).clamp(max=code_map.numel() - 1)
    return torch.where((code_map[upper] - values) < (values - code_map[low]), upper, low).to(torch.uint8)


def _hard_values(code_map: torch.Tensor, signed: bool, generator: torch.Generator) -> torch.Tensor:
    """fp32 values where a code decision is made: every entry, every midpoint, 3 ulps either side of each,
    the ends and zeros; and random values, uniform and log-uniform in magnitude over 2^-40 .. 2^0.1."""
    entries = code_map.float()
    midpoints = ((entries[1:].double() + entries[:-1].double()) / 2).float()
    points, parts = torch.cat([entries, midpoints]), []
    for direction in (2.0, -2.0):
        nearby = points
        for _ in range(3):
            nearby = torch.nextafter(nearby, torch.full_like(nearby, direction))
            parts.append(nearby)
    count = 200_000
    uniform = torch.rand(count, generator=generator) * (2 if signed else 1) - (1 if signed else 0)
    magnitudes = torch.exp2(torch.rand(count, generator=generator, dtype=torch.float64) * 40.1 - 40).float()
    signs = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0) if signed else torch.ones(count)
    ends = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 1e-45, -1e-45, 2**-30, 2**-14, 2**-33])
    values = torch.cat([points, *parts, uniform, magnitudes * signs, ends]).float()
    return values if signed else values.abs()


@triton.jit
def _nearest_codes_probe(values, codes, n, SIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    value = tl.load(values + offsets, mask=mask, other=0.0)
    tl.store(codes + offsets, adam_triton._nearest_code(value, SIGNED).to(tl.uint8), mask=mask)


@triton.jit
def _code_values_probe(values, SIGNED: tl.constexpr):
    codes = tl.arange(0, 256)
    tl.store(values + codes, adam_triton._code_value(codes.to(tl.uint8), SIGNED))


def _launch_block() -> int:
    return 65536 if DEVICE.type == "cpu" else 1024


def _triton_codes(values: torch.Tensor, signed: bool) -> torch.Tensor:
    """The Triton kernel's nearest codes, on DEVICE: compiled for the GPU there, else interpreted."""
    codes = torch.full(values.shape, 77, dtype=torch.uint8, device=DEVICE)  # poisoned: every element is written
    block = _launch_block()
    _nearest_codes_probe[(triton.cdiv(values.numel(), block),)](values.to(DEVICE), codes, values.numel(), signed, block)
    return codes.cpu()


def _triton_code_values(signed: bool) -> torch.Tensor:
    """The Triton kernel's value of every code, on DEVICE."""
    values = torch.full((256,), float("nan"), device=DEVICE)  # poisoned
    _code_values_probe[(1,)](values, signed)
    return values.cpu()


def _cuda_host() -> types.ModuleType:
    cuda_host = pytest.importorskip("cuda_host")
    if cuda_host.unavailable_reason(torch.device("cpu"), torch.float32) is not None:
        pytest.skip(cuda_host.unavailable_reason(torch.device("cpu"), torch.float32))
    return cuda_host


def _cuda_host_codes(values: torch.Tensor, signed: bool) -> torch.Tensor:
    return _cuda_host().nearest_codes(values, signed)


def _cuda_host_code_values(signed: bool) -> torch.Tensor:
    return _cuda_host().code_values(signed)


def _cpu_codes(values: torch.Tensor, signed: bool) -> torch.Tensor:
    """The same function built as the cpu backend builds it (vectorized)."""
    return _cuda_host().nearest_codes(values, signed, vectorized=True)


def _cpu_code_values(signed: bool) -> torch.Tensor:
    return _cuda_host().code_values(signed, vectorized=True)


@pytest.mark.parametrize(
    "kernel", [_triton_code_values, _cuda_host_code_values, _cpu_code_values], ids=["triton", "cuda-host", "cpu"]
)
@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_the_kernels_code_values_are_the_map_bit_for_bit(kernel, name):
    """Each kernel's code_value, computed from the code's bits, is the fp32 map entry for all 256 codes, to the
    bit (the sign of entry 127's -0.0 included)."""
    code_map = (signed_map() if name == "signed" else unsigned_map()).float()
    actual = kernel(name == "signed")
    wrong = (actual.view(torch.int32) != code_map.view(torch.int32)).nonzero().flatten()
    assert wrong.numel() == 0, (
        f"{wrong.numel()} values differ, e.g. codes {wrong[:3].tolist()}: {actual[wrong[:3]].tolist()} instead of "
        f"{code_map[wrong[:3]].tolist()}"
    )


@pytest.mark.parametrize("kernel", [_triton_codes, _cuda_host_codes, _cpu_codes], ids=["triton", "cuda-host", "cpu"])
@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_the_kernels_nearest_code_is_the_binary_search(kernel, name):
    """Each kernel's nearest_code (kernels/adam_triton.py compiled for the GPU, or under the interpreter on a
    CPU; kernels/adam_cuda.cu built for the host, and as the cpu backend builds it) picks the same code as the
    binary search for every value where a decision is made (about 10,000) and 400,000 random ones. (NaN, whose code
    is unspecified, is not among them.)"""
    code_map = (signed_map() if name == "signed" else unsigned_map()).float()
    values = _hard_values(code_map, name == "signed", seeded_generator("nearest code", name))
    expected = _searched_codes(values, code_map)
    actual = kernel(values, name == "signed")
    wrong = (actual != expected).nonzero().flatten()
    assert wrong.numel() == 0, (
        f"{wrong.numel()} codes differ, e.g. value {values[wrong[:3]].tolist()}: "
        f"{actual[wrong[:3]].tolist()} instead of {expected[wrong[:3]].tolist()}"
    )
