"""The 8-bit moment quantizer's float64 model (adam_gpu/quantization.py): the maps and the nearest-code
rule that the fused kernels will be held to."""

from __future__ import annotations

import pytest
import torch
from support import seeded_generator

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
