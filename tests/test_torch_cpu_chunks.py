"""The torch backend's CPU step on fp32 working chunks (adam_gpu/backends/torch_chunks.py) and its pieces: the
table-lookup nearest code against the binary search, the lean master's integer split against its definition, and
steps whose tensors cross chunk boundaries or share a chunk against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from support import DEVICE, StepCase, assert_close_relative, assert_correctly_rounded, check_one_step, seeded_generator

from adam_gpu import fused_adam
from adam_gpu.backends import torch_chunks
from adam_gpu.backends.lean_master import lean_master, split_lean_master
from adam_gpu.backends.torch_codes import code_map, nearest_codes, searched_codes
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.quantization import SMALL_TENSOR, dequantize, quantize, signed_map, unsigned_map

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the chunked step is the torch backend's on CPU tensors")
CHUNK = torch_chunks.chunk_elements()


def _random_bits(generator: torch.Generator, numel: int) -> torch.Tensor:
    """fp32 values of uniformly random bit patterns: every exponent, NaNs and infinities included."""
    return torch.randint(-(2**31), 2**31, (numel,), generator=generator, dtype=torch.int64).to(torch.int32)


def _near_decisions(entries: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each map entry and each midpoint between neighbours, and the 20 fp32 values either side of each."""
    points = torch.cat([entries, (entries[1:] + entries[:-1]) / 2])
    bits = points.view(torch.int32)[:, None] + torch.arange(-20, 21, dtype=torch.int32)
    values = bits.flatten().view(torch.float32)
    return values[values.abs() <= 1][torch.randperm(values[values.abs() <= 1].numel(), generator=generator)]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_table_lookup_picks_the_binary_searchs_code(signed):
    generator = seeded_generator("code table", signed)
    entries = code_map(signed, torch.device("cpu"))
    random = _random_bits(generator, 1_000_000).view(torch.float32)
    uniform = torch.rand(1_000_000, generator=generator) * (2 if signed else 1) - (1 if signed else 0)
    values = torch.cat([_near_decisions(entries, generator), random[random.abs() <= 1], uniform, entries])
    values = torch.cat([values, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    if not signed:
        values = values[values >= 0]
    actual, expected = nearest_codes(values, signed), searched_codes(values, entries)
    wrong = (actual.long() != expected).nonzero().flatten()
    assert wrong.numel() == 0, f"{wrong.numel()} codes differ, e.g. at {values[wrong[:3]].tolist()}"


def test_the_lean_split_is_its_definition_bit_for_bit():
    """The param is the value's high half rounded half up on the bits (a NaN: its high half, quiet), the remainder
    what is left, and lean_master puts any (param, remainder) pair back as (param << 16) + remainder."""
    bits = _random_bits(seeded_generator("lean split"), 1 << 20)
    bits[:6] = torch.tensor([0x7FFF8000, 0x7F800001, -1, 0x7F7FFFFF, 0x00008000, -(2**31)], dtype=torch.int32)
    value = bits.view(torch.float32)
    param, remainder = split_lean_master(value)
    wide = bits.to(torch.int64) & 0xFFFFFFFF
    expected = torch.where(value.isnan(), (wide >> 16) | 0x40, (wide + 0x8000) >> 16) & 0xFFFF
    assert torch.equal(param.view(torch.int16).to(torch.int64) & 0xFFFF, expected)
    assert torch.equal((remainder.to(torch.int64) & 0xFFFF), (wide - (expected << 16)) & 0xFFFF)
    rebuilt = lean_master(param, remainder).view(torch.int32)
    finite = ~value.isnan()
    assert torch.equal(rebuilt[finite], bits[finite])
    assert bool(rebuilt.view(torch.float32)[~finite].isnan().all())


HPS = {
    "adamw": AdamHyperparameters(1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled=True),
    "adam-l2-amsgrad-maximize": AdamHyperparameters(1e-3, 0.8, 0.99, 1e-6, 0.05, amsgrad=True, maximize=True),
}


@pytest.mark.parametrize("hp", HPS.values(), ids=HPS.keys())
@pytest.mark.parametrize(
    "policy",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["bf16-fp32-state", "fp16-fp32-state", "fp32-bf16-state"],
)
def test_a_tensor_across_chunks_steps_as_the_reference(policy, hp):
    param_dtype, state_dtype = policy
    case = StepCase.draw(2 * CHUNK + 257, seeded_generator("across chunks", policy, hp))
    check_one_step("torch", case.rounded(param_dtype, state_dtype), param_dtype, state_dtype, hp)


@pytest.mark.parametrize("master", ["fp32", "lean", None])
def test_many_tensors_sharing_chunks_step_as_the_reference(master, monkeypatch):
    """Small tensors gathered into one chunk and a large one split over several, bf16 params and fp32 moments, with
    fp32 or lean masters: each steps as the float64 reference from its own values."""
    hp, real = HPS["adamw"], torch_chunks.chunked_step
    generator = seeded_generator("sharing chunks", master)
    cases = [StepCase.draw(n, generator).rounded(torch.bfloat16, torch.float32) for n in (1, 300, 4097, CHUNK + 3, 5)]
    params = [c.param.to(torch.bfloat16) for c in cases]
    masters = {
        "fp32": [c.param.float() for c in cases],
        "lean": [torch.zeros(c.param.numel(), dtype=torch.int16) for c in cases],
        None: None,
    }[master]
    moments = [[c.exp_avg.float() for c in cases], [c.exp_avg_sq.float() for c in cases]]
    chunked = []
    monkeypatch.setattr(torch_chunks, "chunked_step", lambda *args: chunked.append(real(*args)))
    fused_adam(
        params, [c.grad.to(torch.bfloat16) for c in cases], *moments, [], [torch.tensor(c.step - 1.0) for c in cases],
        lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, weight_decay=hp.weight_decay, decoupled=True,
        backend="torch", masters=masters,
    )  # fmt: skip
    assert len(chunked) == 1, "the step did not go through the chunked path"
    for index, case in enumerate(cases):
        expected = case.reference(hp)
        assert_correctly_rounded(params[index], expected.param, f"param {index}", case.param)
        assert_close_relative(moments[0][index], expected.exp_avg, f"exp_avg {index}", case.exp_avg)
        assert_close_relative(moments[1][index], expected.exp_avg_sq, f"exp_avg_sq {index}", case.exp_avg_sq)
        if master == "fp32":
            assert_close_relative(masters[index], expected.param, f"master {index}", case.param)
            assert torch.equal(params[index], masters[index].to(torch.bfloat16))
        elif master == "lean":
            whole = lean_master(params[index], masters[index])
            assert_close_relative(whole, expected.param, f"lean master {index}", case.param)


def test_8bit_moments_sharing_chunks_step_as_the_float64_model():
    """8-bit tensors whose last blocks are short, packed into chunks beside a small fp32-moment tensor: each param
    steps as the float64 reference from its dequantized moments, and its codes are the model's for the new moments
    (one off where an fp32 value sits on a decision midpoint, as tests/test_8bit.py allows)."""
    hp = HPS["adamw"]
    generator = seeded_generator("8bit sharing chunks")
    cases = [StepCase.draw(n, generator).rounded(torch.bfloat16, torch.float64) for n in (4097, 300, 5000, CHUNK + 3)]
    maps = (signed_map(), unsigned_map())
    stored = []
    for case in cases:
        if case.param.numel() < SMALL_TENSOR:
            stored.append([(case.exp_avg.float(), None), (case.exp_avg_sq.float(), None)])
            continue
        quantized = [
            quantize(values, entries) for values, entries in zip((case.exp_avg, case.exp_avg_sq), maps, strict=True)
        ]
        case.exp_avg, case.exp_avg_sq = (dequantize(*q, entries) for q, entries in zip(quantized, maps, strict=True))
        stored.append(quantized)
    params = [c.param.to(torch.bfloat16) for c in cases]
    fused_adam(
        params, [c.grad.to(torch.bfloat16) for c in cases], [s[0][0] for s in stored], [s[1][0] for s in stored], [],
        [torch.tensor(c.step - 1.0) for c in cases], lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
        weight_decay=hp.weight_decay, decoupled=True, backend="torch",
        exp_avg_absmaxes=[s[0][1] for s in stored], exp_avg_sq_absmaxes=[s[1][1] for s in stored],
    )  # fmt: skip
    for index, (case, moments) in enumerate(zip(cases, stored, strict=True)):
        expected = case.reference(hp)
        assert_correctly_rounded(params[index], expected.param, f"param {index}", case.param)
        for (codes, absmax), want, entries in zip(moments, (expected.exp_avg, expected.exp_avg_sq), maps, strict=True):
            if absmax is None:
                assert_close_relative(codes, want, f"moment {index}")
                continue
            want_codes, want_absmax = quantize(want, entries)
            assert_close_relative(absmax, want_absmax.double(), f"absmax {index}")
            off = (codes.long() - want_codes.long()).abs()
            assert int(off.max()) <= 1 and float((off > 0).double().mean()) <= 1e-3, f"codes {index}"
