"""8-bit moments inside the fused step (backends with the feature), against the float64 model of the
quantizer (adam_gpu/quantization.py) and the float64 reference step; backends without it say so."""

from __future__ import annotations

import io
import sys
import types

import pytest
import torch
from support import (
    DEVICE,
    StepCase,
    assert_close_relative,
    assert_correctly_rounded,
    assert_unchanged,
    backend_params,
    has_feature,
    optimizer_tensors,
    seeded_generator,
    snapshot,
)

from adam_gpu import BackendUnavailableError, FusedAdamW, dispatch, fused_adam
from adam_gpu.backends import torch as torch_backend
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.quantization import BLOCK, SMALL_TENSOR, dequantize, quantize, signed_map, unsigned_map
from adam_gpu.step_tensors import EIGHT_BIT

HP = AdamHyperparameters(1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled=True)
# Codes may differ from the float64 model's by one where the fp32 value sits on a decision midpoint.
MAX_OFF_BY_ONE = 1e-3


def _step(backend, param, grad, moments, step):
    (m_codes, m_absmax), (v_codes, v_absmax) = moments
    return fused_adam(
        [param], [grad], [m_codes], [v_codes], [], [torch.tensor(float(step - 1))],
        lr=HP.lr, beta1=HP.beta1, beta2=HP.beta2, eps=HP.eps, weight_decay=HP.weight_decay, decoupled=True,
        backend=backend, exp_avg_absmaxes=[m_absmax], exp_avg_sq_absmaxes=[v_absmax],
    )  # fmt: skip


def _check_codes(codes, absmax, expected_values, code_map, what):
    want_codes, want_absmax = quantize(expected_values, code_map)
    assert_close_relative(absmax, want_absmax.double(), f"{what} absmax")
    differ = codes.cpu().long() != want_codes.long()
    assert float(differ.double().mean()) <= MAX_OFF_BY_ONE, f"{what}: {int(differ.sum())} codes differ"
    assert int((codes.cpu().long() - want_codes.long()).abs().max()) <= 1, f"{what}: a code is off by more than one"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("size", [4096, 4097, 65537, 100_003])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_8bit_step_matches_the_float64_model(backend, size, param_dtype):
    if not has_feature(backend, EIGHT_BIT):
        pytest.skip(f"the {backend} backend has no 8-bit moments yet")
    case = StepCase.draw(size, seeded_generator("8bit", backend, size, param_dtype)).rounded(param_dtype, torch.float64)
    m = quantize(case.exp_avg, signed_map())
    v = quantize(case.exp_avg_sq, unsigned_map())
    # The reference starts from exactly what is stored: the dequantized moments.
    case.exp_avg, case.exp_avg_sq = dequantize(*m, signed_map()), dequantize(*v, unsigned_map())
    param = case.param.to(device=DEVICE, dtype=param_dtype)
    moments = [(codes.to(DEVICE), absmax.to(DEVICE)) for codes, absmax in (m, v)]
    assert _step(backend, param, case.grad.to(device=DEVICE, dtype=param_dtype), moments, case.step) == backend

    expected = case.reference(HP)
    check = assert_close_relative if param_dtype == torch.float32 else assert_correctly_rounded
    # The param is updated from the fp32 moments before they are quantized.
    check(param, expected.param, "param", case.param)
    _check_codes(*moments[0], expected.exp_avg, signed_map(), "exp_avg")
    _check_codes(*moments[1], expected.exp_avg_sq, unsigned_map(), "exp_avg_sq")
    assert moments[0][1].numel() == -(-size // BLOCK)


def _lean_split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 param (``master`` rounded half-up on its bits) and the int16 remainder that restores it exactly."""
    bits = master.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    param_bits = (bits + 0x8000) >> 16
    remainder = (bits - (param_bits << 16)) & 0xFFFF
    return _int16(param_bits).view(torch.bfloat16), _int16(remainder)


def _int16(halves: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^16) as the int16 of the same bits."""
    return torch.where(halves >= 0x8000, halves - 0x10000, halves).to(torch.int16)


def _lean_master(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    high = (param.view(torch.int16).to(torch.int64) & 0xFFFF) << 16
    bits = (high + remainder.to(torch.int64)) & 0xFFFFFFFF
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("master_weights", [True, "lean"], ids=["fp32-master", "lean-master"])
def test_an_8bit_step_of_bf16_params_with_a_master_matches_the_float64_model(backend, master_weights):
    """The master (fp32, or the bf16 param and its remainder) takes the step from the fp32 moments; the param is
    its rounding; the codes are the float64 model's."""
    if not has_feature(backend, EIGHT_BIT):
        pytest.skip(f"the {backend} backend has no 8-bit moments yet")
    size = 2 * SMALL_TENSOR + 33
    case = StepCase.draw(size, seeded_generator("8bit master", backend, master_weights)).rounded(
        torch.float32, torch.float64
    )
    m, v = quantize(case.exp_avg, signed_map()), quantize(case.exp_avg_sq, unsigned_map())
    case.exp_avg, case.exp_avg_sq = dequantize(*m, signed_map()), dequantize(*v, unsigned_map())
    if master_weights is True:
        master = case.param.float().to(DEVICE)
        param = master.bfloat16()
    else:
        param, master = (t.to(DEVICE) for t in _lean_split(case.param))
        case.param = _lean_master(param.cpu(), master.cpu()).double()  # (exactly the stored master)
    moments = [(codes.to(DEVICE), absmax.to(DEVICE)) for codes, absmax in (m, v)]
    grad = case.grad.to(device=DEVICE, dtype=torch.bfloat16)
    case.grad = grad.double().cpu()
    (m_codes, m_absmax), (v_codes, v_absmax) = moments
    ran = fused_adam(
        [param], [grad], [m_codes], [v_codes], [], [torch.tensor(float(case.step - 1))],
        lr=HP.lr, beta1=HP.beta1, beta2=HP.beta2, eps=HP.eps, weight_decay=HP.weight_decay, decoupled=True,
        backend=backend, masters=[master], exp_avg_absmaxes=[m_absmax], exp_avg_sq_absmaxes=[v_absmax],
    )  # fmt: skip
    assert ran == backend

    expected = case.reference(HP)
    if master_weights is True:
        stepped = master
        assert torch.equal(param, master.bfloat16()), "the param is its master rounded to nearest even"
    else:
        stepped = _lean_master(param.cpu(), master.cpu())
        assert torch.equal(_lean_split(stepped)[0], param.cpu()), "the param is its master rounded half-up"
    assert_close_relative(stepped, expected.param, "master", case.param)
    _check_codes(*moments[0], expected.exp_avg, signed_map(), "exp_avg")
    _check_codes(*moments[1], expected.exp_avg_sq, unsigned_map(), "exp_avg_sq")


def _offset_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values in a view one element into a larger buffer: contiguous, but no longer 16-byte aligned."""
    buffer = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
    buffer[1:] = tensor.flatten()
    return buffer[1:].view(tensor.shape)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_misaligned_8bit_tensors_step_as_aligned_ones(backend, param_dtype):
    """Params, grads and codes that do not start on a 16-byte boundary take the kernels' element-wise path (the
    CUDA C kernel's single elements, Triton's scalar chunks), which gives the same bits as the vector path; the
    size ends inside a quantization block, so both paths meet a tail."""
    if not has_feature(backend, EIGHT_BIT):
        pytest.skip(f"the {backend} backend has no 8-bit moments yet")
    size = 3 * BLOCK * 8 + 77
    case = StepCase.draw(size, seeded_generator("8bit misaligned", backend, param_dtype))
    m, v = quantize(case.exp_avg, signed_map()), quantize(case.exp_avg_sq, unsigned_map())
    inputs = [case.param.to(param_dtype), case.grad.to(param_dtype), m[0], m[1], v[0], v[1]]
    inputs = [tensor.to(DEVICE) for tensor in inputs]
    results = []
    for place in (torch.Tensor.clone, _offset_copy):
        param, grad, m_codes, m_absmax, v_codes, v_absmax = map(place, inputs)
        _step(backend, param, grad, ((m_codes, m_absmax), (v_codes, v_absmax)), case.step)
        results.append([param, m_codes, m_absmax, v_codes, v_absmax])
    names = ["param", "exp_avg codes", "exp_avg absmax", "exp_avg_sq codes", "exp_avg_sq absmax"]
    for name, aligned, offset in zip(names, *results, strict=True):
        assert torch.equal(aligned.view(torch.uint8), offset.view(torch.uint8)), f"{name} differs when misaligned"
    assert results[1][1].data_ptr() % 16 and results[1][0].data_ptr() % 16, "the offset copies are misaligned"


def test_a_backend_without_8bit_moments_says_so_and_auto_passes_it_over(monkeypatch):
    """Dispatch checks the features a step needs: a backend module without EIGHT_BIT in its FEATURES (the
    torch backend's functions, without the list) is refused by name and skipped by auto."""
    featureless = types.ModuleType("featureless")
    featureless.unavailable_reason = torch_backend.unavailable_reason
    featureless.adam_step = torch_backend.adam_step
    monkeypatch.setitem(sys.modules, "featureless", featureless)
    monkeypatch.setitem(dispatch.BACKENDS, "featureless", dispatch.Backend("featureless", "featureless", None))
    monkeypatch.setattr(dispatch, "DEFAULT_AUTO_ORDER", ("featureless", "torch"))
    monkeypatch.setattr(dispatch, "AUTO_ORDER", dict.fromkeys(dispatch.AUTO_ORDER, ("featureless", "torch")))
    case = StepCase.draw(4096, seeded_generator("8bit-missing"))
    moments = [quantize(case.exp_avg, signed_map()), quantize(case.exp_avg_sq, unsigned_map())]
    moments = [(codes.to(DEVICE), absmax.to(DEVICE)) for codes, absmax in moments]
    param, grad = case.param.float().to(DEVICE), case.grad.float().to(DEVICE)
    with pytest.raises(BackendUnavailableError, match="does not support 8-bit moments yet"):
        _step("featureless", param, grad, moments, case.step)
    assert _step("auto", param, grad, moments, case.step) == "torch"


@pytest.mark.parametrize("backend", backend_params())
def test_fused_adamw_with_8bit_moments_trains_and_round_trips_its_state(backend):
    if not has_feature(backend, EIGHT_BIT):
        pytest.skip(f"the {backend} backend has no 8-bit moments yet")
    generator = seeded_generator("8bit optimizer", backend)
    params = [torch.randn(shape, generator=generator).to(DEVICE).requires_grad_() for shape in ((70, 90), (100,))]
    optimizer = FusedAdamW(params, lr=1e-2, state_dtype="8bit", backend=backend)
    for _ in range(3):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(DEVICE)
        optimizer.step()
    big, small = (optimizer.state[p] for p in params)
    assert big["exp_avg_codes"].dtype == torch.uint8 and big["exp_avg_absmax"].numel() == -(-6300 // BLOCK)
    assert "exp_avg" not in big and small["exp_avg"].dtype == torch.float32, "small tensors keep fp32 moments"
    state_bytes = sum(t.numel() * t.element_size() for k, t in big.items() if k != "step") / params[0].numel()
    assert state_bytes == pytest.approx(2 + 2 * 4 / BLOCK, rel=0.01)  # 2 codes + 2 absmax per 256

    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    twins = [p.detach().clone().requires_grad_() for p in params]
    loaded = FusedAdamW(twins, lr=1e-2, state_dtype="8bit", backend=backend)
    loaded.load_state_dict(torch.load(saved))
    for key, value in big.items():
        assert torch.equal(loaded.state[twins[0]][key], value), key
    for p, q in zip(params, twins, strict=True):
        p.grad = torch.randn(p.shape, generator=generator).to(DEVICE)
        q.grad = p.grad.clone()
    optimizer.step()
    loaded.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins, strict=True)), "a reloaded optimizer steps alike"


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "make_bad",
    [
        lambda absmax: torch.nested.nested_tensor([absmax.clone()]),
        lambda absmax: absmax.to_sparse(),
        lambda absmax: absmax[:-1].clone(),
        lambda absmax: absmax.double(),
    ],
    ids=["nested", "sparse", "short", "float64"],
)
def test_an_unfit_absmax_put_in_the_state_after_steps_is_refused(backend, make_bad):
    """After steps that the reused step serves, an absmax that is not a dense fp32 tensor of one value per
    block is refused by name, and nothing is written (a nested one would abort the process in torch's
    TensorGuards, were it given one)."""
    if not has_feature(backend, EIGHT_BIT):
        pytest.skip(f"the {backend} backend has no 8-bit moments yet")
    generator = seeded_generator("8bit unfit absmax", backend)
    param = torch.randn(70, 90, generator=generator).to(DEVICE).requires_grad_()
    optimizer = FusedAdamW([param], lr=1e-2, state_dtype="8bit", backend=backend)
    for _ in range(2):
        param.grad = torch.randn(param.shape, generator=generator).to(DEVICE)
        optimizer.step()
    unfit = "group 0 param 0 exp_avg_sq_absmax"
    before = snapshot(optimizer_tensors(optimizer, but=unfit))
    state = optimizer.state[param]
    state["exp_avg_sq_absmax"] = make_bad(state["exp_avg_sq_absmax"])
    with pytest.raises(ValueError, match=r"8-bit optimizer state 0 needs an fp32 absmax of 25 blocks"):
        optimizer.step()
    assert_unchanged(before, optimizer_tensors(optimizer, but=unfit))


# The compiled kernels: Triton's (under its interpreter), the CUDA C kernel built for the host, the cpu backend.
COMPILED_KERNELS = ("triton", "cuda-host", "cpu")
# (param dtype, master_weights) of the 8-bit policies.
EIGHT_BIT_POLICIES = {
    "fp32": (torch.float32, False),
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
    "bf16-fp32-master": (torch.bfloat16, True),
    "bf16-lean-master": (torch.bfloat16, "lean"),
}


@pytest.mark.parametrize("policy", EIGHT_BIT_POLICIES)
def test_the_compiled_kernels_step_8bit_state_bit_for_bit_alike(policy):
    """On the CPU the compiled kernels that run there step 8-bit moments to the same bits: params, masters, codes
    and absmaxes, over tensors whose ends fall at odd places in a block and across the cpu backend's chunks. They
    normalize a block by the product with its IEEE reciprocal, so their codes agree with each other at every
    decision point (the float64 model, which divides, is the looser reference of the tests above)."""
    dtype, master_weights = EIGHT_BIT_POLICIES[policy]
    cpu = torch.device("cpu")
    kernels = [name for name in COMPILED_KERNELS if dispatch.unavailable_reason(name, cpu, [dtype]) is None]
    if len(kernels) < 2:
        pytest.skip(f"fewer than two of {COMPILED_KERNELS} run {dtype} on this machine: {kernels}")
    generator = seeded_generator("8bit compiled alike", policy)
    shapes = [(SMALL_TENSOR + 1,), (67, 71), (2**16 + 2 * BLOCK + 3,)]
    start = [(torch.randn(shape, generator=generator) * 3).to(dtype) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator).to(dtype) for shape in shapes] for _ in range(3)]

    def trained(kernel: str) -> list[torch.Tensor]:
        params = [p.clone() for p in start]
        optimizer = FusedAdamW(
            params, lr=1e-2, weight_decay=0.1, state_dtype="8bit", master_weights=master_weights, backend=kernel
        )
        for step_grads in grads:
            for param, grad in zip(params, step_grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
        states = [optimizer.state[p] for p in params]
        return [*params, *(value for state in states for key, value in sorted(state.items()) if key != "step")]

    first, *others = kernels
    expected = trained(first)
    assert not torch.equal(expected[0], start[0]), "training did nothing"
    for kernel in others:
        for index, (actual, want) in enumerate(zip(trained(kernel), expected, strict=True)):
            assert actual.dtype == want.dtype and torch.equal(actual.view(torch.uint8), want.view(torch.uint8)), (
                f"{kernel} and {first} differ in tensor {index}: {int((actual != want).sum())} elements"
            )


def test_8bit_moments_refuse_amsgrad_and_torch_optim_refuses_them():
    with pytest.raises(ValueError, match="amsgrad with 8-bit moments is not supported"):
        FusedAdamW([torch.zeros(5000, device=DEVICE)], state_dtype="8bit", amsgrad=True)
    param = torch.randn(5000, device=DEVICE, requires_grad=True)
    ours = FusedAdamW([param], state_dtype="8bit", backend="torch")
    param.grad = torch.randn_like(param)
    ours.step()
    theirs = torch.optim.AdamW([param.detach().clone().requires_grad_()])
    theirs.load_state_dict(ours.state_dict())
    theirs.param_groups[0]["params"][0].grad = torch.randn(5000, device=DEVICE)
    with pytest.raises(KeyError):  # loud, never training on codes read as moments
        theirs.step()


# Triton's CPU interpreter computes with numpy, which warns about the NaN it is meant to compute here.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", backend_params())
def test_non_finite_moment_makes_its_block_nan_in_every_backend(backend):
    """A NaN or Inf grad reaches the param at its own element (the update uses the fp32 moments), and the
    blocks holding a non-finite moment get absmax NaN, so that from the next step on the whole block reads
    NaN: no code holds NaN or Inf, and dropping it into a finite code would hide it. The other blocks are
    untouched by the poison (equal to a clean run's)."""
    if not has_feature(backend, EIGHT_BIT):
        pytest.skip(f"the {backend} backend has no 8-bit moments yet")
    generator = seeded_generator("8bit non-finite", backend)
    start = torch.randn(SMALL_TENSOR + 17, generator=generator).to(DEVICE)  # (smaller ones keep fp32 moments)
    grads = [torch.randn(start.shape, generator=generator).to(DEVICE) for _ in range(3)]
    poisoned = {3: float("nan"), BLOCK + 5: float("inf"), 3 * BLOCK + 200: float("-inf")}  # blocks 0, 1, 3
    bad_blocks = sorted({index // BLOCK for index in poisoned})

    absmax_keys = ("exp_avg_absmax", "exp_avg_sq_absmax")

    def run(poison: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """The params and the absmaxes after each step."""
        param = start.clone()
        optimizer = FusedAdamW([param], lr=1e-2, backend=backend, state_dtype="8bit")
        params_after, absmaxes_after = [], []
        for step, grad in enumerate(grads):
            param.grad = grad.clone()
            if poison and step == 1:
                for index, value in poisoned.items():
                    param.grad[index] = value
            optimizer.step()
            params_after.append(param.detach().clone())
            absmaxes_after.append({key: optimizer.state[param][key].clone() for key in absmax_keys})
        return params_after, absmaxes_after

    clean, clean_absmaxes = run(poison=False)
    poisoned_run, absmaxes = run(poison=True)
    assert sorted(torch.nonzero(poisoned_run[1].isnan()).flatten().tolist()) == sorted(poisoned), (
        "after the poisoned step the params are NaN at exactly the poisoned elements (as torch.optim's)"
    )
    for key in absmax_keys:  # right after the poisoned step
        absmax, clean_absmax = absmaxes[1][key], clean_absmaxes[1][key]
        nan_blocks = torch.nonzero(absmax.isnan()).flatten().tolist()
        assert nan_blocks == bad_blocks, f"{key}: NaN in blocks {nan_blocks}, expected {bad_blocks}"
        good = ~absmax.isnan()
        assert torch.equal(absmax[good], clean_absmax[good]), f"{key} of the other blocks"
    blocks = torch.arange(start.numel(), device=DEVICE) // BLOCK
    in_bad_block = torch.isin(blocks, torch.tensor(bad_blocks, device=DEVICE))
    assert bool(poisoned_run[2][in_bad_block].isnan().all()), "a poisoned block did not read NaN the step after"
    assert torch.equal(poisoned_run[2][~in_bad_block], clean[2][~in_bad_block]), "the poison reached other blocks"
