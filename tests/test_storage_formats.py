"""The storage formats' registry (adam_gpu/storage_formats.py) agrees with what the optimizer creates and saves, what
the checks accept, and what the kernels and launchers are built with."""

from __future__ import annotations

import importlib.resources
import itertools

import pytest
import torch
import triton.language as tl

from adam_gpu import FusedAdam, quantization, storage_formats
from adam_gpu.backends import cuda_source
from adam_gpu.backends.triton import TRITON_TYPES
from adam_gpu.kernel_abi import Master, cuda_constant_name
from adam_gpu.state_layout import check_loadable
from adam_gpu.step_tensors import master_mode
from adam_gpu.storage_formats import (
    MASTER_MODES,
    MOMENT_FORMATS,
    NO_MASTER,
    PARAM_DTYPES,
    PLAIN_KEYS,
    SCALED_FORMATS,
    STORAGE_TYPES,
    master_modes_of,
)

LARGE = 5000  # elements: above every scaled format's min_numel, and not a whole number of blocks
SMALL = 7


def _stepped(param_dtype: torch.dtype, state_dtype: object, master_weights: object, amsgrad: bool) -> FusedAdam:
    """An optimizer of a large and a small param, after one step (the torch backend, on the CPU)."""
    params = [torch.randn(n, dtype=param_dtype, requires_grad=True) for n in (LARGE, SMALL)]
    optimizer = FusedAdam(
        params, backend="torch", state_dtype=state_dtype, master_weights=master_weights, amsgrad=amsgrad
    )
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    return optimizer


def _cases() -> list[tuple[torch.dtype, storage_formats.MomentFormat, storage_formats.MasterMode, bool]]:
    cases = []
    for param_dtype, fmt, amsgrad in itertools.product(PARAM_DTYPES, MOMENT_FORMATS, (False, True)):
        if amsgrad and not fmt.amsgrad:
            continue
        cases += [(param_dtype, fmt, mode, amsgrad) for mode in master_modes_of(param_dtype)]
    return cases


def _expected_keys(fmt: storage_formats.MomentFormat, mode: storage_formats.MasterMode, numel: int, amsgrad: bool):
    scaled = fmt.scale is not None and numel >= fmt.scale.min_numel
    keys = {"step", *(fmt.keys + fmt.scale.keys if scaled else PLAIN_KEYS[:2])}
    if amsgrad:
        keys.add("max_exp_avg_sq")
    if mode.key is not None:
        keys.add(mode.key)
    return keys


def _case_id(case: tuple) -> str:
    param_dtype, fmt, mode, amsgrad = case
    return f"{param_dtype}-{fmt.option_text}-master={mode.option!r}" + ("-amsgrad" if amsgrad else "")


@pytest.mark.parametrize(("param_dtype", "fmt", "mode", "amsgrad"), _cases(), ids=list(map(_case_id, _cases())))
def test_every_format_saves_under_its_keys_and_dtypes_and_loads_back(param_dtype, fmt, mode, amsgrad):
    optimizer = _stepped(param_dtype, fmt.option, mode.option, amsgrad)
    saved = optimizer.state_dict()
    for index, numel in enumerate((LARGE, SMALL)):
        state = saved["state"][index]
        assert set(state) == _expected_keys(fmt, mode, numel, amsgrad)
        scaled = fmt.scale is not None and numel >= fmt.scale.min_numel
        for moment, key in enumerate(fmt.keys if scaled else PLAIN_KEYS[:2]):
            assert state[key].dtype == (fmt.dtype if scaled else fmt.plain_dtype or param_dtype)
            if scaled:
                assert state[fmt.scale.keys[moment]].dtype == fmt.scale.dtype
                assert state[fmt.scale.keys[moment]].numel() == fmt.scale.blocks(numel)
        if mode.key is not None:
            assert state[mode.key].dtype == mode.dtype
            assert master_mode(optimizer.param_groups[0]["params"][index], state[mode.key]) == mode.kernel.value
    again = _stepped(param_dtype, fmt.option, mode.option, amsgrad)
    check_loadable(saved, again.param_groups)
    again.load_state_dict(saved)
    for index in (0, 1):
        for key, value in saved["state"][index].items():
            assert torch.equal(again.state_dict()["state"][index][key], value), key


@pytest.mark.parametrize("fmt", SCALED_FORMATS, ids=lambda fmt: fmt.name)
def test_a_state_dict_missing_any_key_of_a_scaled_format_is_refused(fmt):
    saved = _stepped(torch.bfloat16, fmt.option, False, False).state_dict()
    for key in (*fmt.keys, *fmt.scale.keys):
        broken = {**saved, "state": {**saved["state"], 0: {k: v for k, v in saved["state"][0].items() if k != key}}}
        with pytest.raises(ValueError, match="cannot load the state of param 0"):
            check_loadable(broken, _stepped(torch.bfloat16, fmt.option, False, False).param_groups)


def test_formats_and_modes_are_told_apart_by_what_they_store():
    """The checks and the launchers find a moment format by its storage dtype and a master mode by its master's
    dtype: no two may share one, and a scaled format's keys are not torch's (torch.optim must fail on them)."""
    scaled_dtypes = [f.dtype for f in SCALED_FORMATS]
    assert len(set(scaled_dtypes)) == len(scaled_dtypes)
    assert not set(scaled_dtypes) & {f.dtype for f in MOMENT_FORMATS if f.scale is None}
    for fmt in SCALED_FORMATS:
        assert not set(fmt.keys + fmt.scale.keys) & set(PLAIN_KEYS)
    assert len({f.option_text for f in MOMENT_FORMATS}) == len(MOMENT_FORMATS)
    master_dtypes = [m.dtype for m in MASTER_MODES]
    assert len(set(master_dtypes)) == len(master_dtypes)
    assert len({m.key for m in MASTER_MODES}) == len(MASTER_MODES)


def test_every_kernel_master_mode_has_one_description_and_a_specialization_per_param_dtype():
    assert sorted(m.kernel for m in MASTER_MODES) == sorted(Master)
    names = set(cuda_source.all_name_expressions())
    for param_dtype in PARAM_DTYPES:
        modes = master_modes_of(param_dtype)
        assert modes[0] is NO_MASTER
        assert cuda_source.MASTER_MODES_OF[param_dtype] == tuple(m.kernel for m in modes)
        for fmt, mode in itertools.product(MOMENT_FORMATS, modes):
            state = fmt.dtype or param_dtype
            assert cuda_source.name_expression(param_dtype, state, False, int(mode.kernel)) in names
            assert (cuda_source.name_expression(param_dtype, state, True, int(mode.kernel)) in names) == fmt.amsgrad


def test_every_stored_dtype_has_a_kernel_type():
    stored = {*PARAM_DTYPES, *(f.dtype for f in MOMENT_FORMATS if f.dtype), *(f.scale.dtype for f in SCALED_FORMATS)}
    stored |= {f.scale.small_dtype for f in SCALED_FORMATS}
    assert stored <= {s.dtype for s in STORAGE_TYPES}
    for storage in STORAGE_TYPES:
        assert isinstance(TRITON_TYPES[storage.dtype], tl.dtype)
        assert TRITON_TYPES[storage.dtype].primitive_bitwidth == storage.dtype.itemsize * 8


def test_a_scale_block_is_written_once_and_is_the_specification_s():
    """The CUDA C kernel gets each block size as a generated definition (the .cu itself defines none), the Triton
    kernel reads it from the record, and quantization.py's model blocks by it."""
    from adam_gpu.kernels import adam_triton

    kernel = (importlib.resources.files("adam_gpu.kernels") / cuda_source.SOURCE_NAME).read_text()
    for fmt in SCALED_FORMATS:
        name = cuda_constant_name(fmt.scale.constant)
        assert cuda_source.source().count(f"constexpr int {name} = {fmt.scale.block};") == 1
        assert f"int {name} =" not in kernel and name in kernel
        assert getattr(adam_triton, fmt.scale.constant).value == fmt.scale.block
    block = storage_formats.EIGHT_BIT_MOMENTS.scale.block
    _, absmax = quantization.quantize(torch.ones(block + 1), quantization.signed_map())
    assert absmax.numel() == 2


def test_option_errors_name_every_registered_option():
    with pytest.raises(ValueError) as moment_error:
        FusedAdam([torch.zeros(2, requires_grad=True)], state_dtype="4bit")
    for fmt in MOMENT_FORMATS:
        assert fmt.option_text in str(moment_error.value)
    with pytest.raises(ValueError) as master_error:
        FusedAdam([torch.zeros(2, requires_grad=True)], master_weights="lean8")
    for mode in MASTER_MODES:
        assert repr(mode.option) in str(master_error.value)
