"""The host build's stand-ins for CUDA's fp16 conversions (kernels/cuda_host_shim.h), which the cpu backend and the
tests' CUDA C emulation compute with: bit for bit GCC's _Float16 for every half and every float, and torch's own
conversions, built as the emulation builds them and as the cpu backend does (vectorized loops); and the cpu
backend's hardware conversions (F16C) of fp16 tiles, against the shim's."""

from __future__ import annotations

import pytest
import torch
from support import seeded_generator


@pytest.fixture(scope="module")
def cuda_host():
    cuda_host = pytest.importorskip("cuda_host")
    reason = cuda_host.unavailable_reason(torch.device("cpu"), torch.float16)
    if reason is not None:
        pytest.skip(reason)
    return cuda_host


VECTORIZED = [pytest.param(False, id="emulation-build"), pytest.param(True, id="cpu-backend-build")]


def test_every_half_and_every_float_converts_as_float16(cuda_host):
    """All 2^16 halves and 2^32 floats, in the cpu backend's build (8 s; the emulation's unoptimized build would
    take minutes, and the next test holds it to torch where roundings are decided)."""
    assert cuda_host.float16_mismatches(vectorized=True) == 0


def _hard_floats(generator: torch.Generator) -> torch.Tensor:
    """fp32 values where a rounding to fp16 is decided: every half's value, the midpoints between neighbours
    (exact in fp32), 2 ulps either side of each, the overflow threshold 65520, signed zeros, Inf, NaNs with
    payloads, fp32 subnormals, and random values log-uniform over 2^-30 .. 2^17."""
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    finite = halves[halves.isfinite()].unique()
    midpoints = ((finite[1:].double() + finite[:-1].double()) / 2).float()
    points, parts = torch.cat([finite, midpoints, torch.tensor([65520.0, -65520.0, 65504.0])]), []
    for direction in (float("inf"), float("-inf")):
        nearby = points
        for _ in range(2):
            nearby = torch.nextafter(nearby, torch.full_like(nearby, direction))
            parts.append(nearby)
    nan_bits = torch.tensor([0x7FC00000, 0x7F800001, 0x7FC12345, 0x7FFFFFFF, 0xFFC00000, 0xFF812345, 0x00000001,
                             0x807FFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32)  # fmt: skip
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
    count = 100_000
    randoms = torch.exp2(torch.rand(count, generator=generator, dtype=torch.float64) * 47 - 30).float()
    randoms *= torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    return torch.cat([points, *parts, nan_bits, specials, randoms])


@pytest.mark.parametrize("vectorized", VECTORIZED)
def test_conversions_agree_with_torch(cuda_host, vectorized):
    """Every half to fp32 as torch converts it (its NaNs are NaN: torch canonicalizes their payload), and the fp32
    values where a rounding is decided to the half torch rounds them to, NaN payloads included."""
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    widened = cuda_host.halves_to_floats(halves, vectorized)
    expected = halves.view(torch.float16).float()
    nan = expected.isnan()
    assert torch.equal(widened.isnan(), nan)
    differ = (widened.view(torch.int32) != expected.view(torch.int32)) & ~nan
    assert not differ.any(), f"halves {halves[differ][:4].tolist()} widen to {widened[differ][:4].tolist()}"

    floats = _hard_floats(seeded_generator("fp16 rounding"))
    rounded = cuda_host.floats_to_halves(floats, vectorized)
    expected_halves = floats.half().view(torch.int16)
    differ = rounded != expected_halves
    assert not differ.any(), (
        f"{int(differ.sum())} floats round otherwise, e.g. {floats[differ][:4].tolist()}: "
        f"{rounded[differ][:4].tolist()} instead of {expected_halves[differ][:4].tolist()}"
    )


def test_the_cpu_backends_f16c_conversions_are_the_shims(cuda_host):
    """kernels/adam_cpu.cpp widens fp16 tiles and rounds them back with F16C where the CPU has it: every half and
    every float converts as the shim converts it."""
    mismatches = cuda_host.widened_mismatches()
    if mismatches is None:
        pytest.skip("this build has no F16C: the cpu backend converts fp16 with the shim's arithmetic")
    assert mismatches == 0
