"""``adam-gpu tune`` and the launch configurations it sweeps: a configuration set with ``launch_config(...)``
reaches the kernel launch and keeps the results; the quick sweep on this machine (the Triton kernel under its
interpreter, the CUDA C one unavailable) writes a JSON and a table that agree; a time limit stops it cleanly."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from support import assert_close_relative, seeded_generator

from adam_gpu import FusedAdamW
from adam_gpu.backends import tensor_table
from adam_gpu.backends import triton as triton_backend
from adam_gpu.bench import tune, tune_report
from adam_gpu.bench.records import OK, UNSUPPORTED
from adam_gpu.bench.tune import TuneRun

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only named: building a default configuration touches no device
# Over a few steps in fp32 the kernels differ from torch.optim.AdamW's for-loop by rounding carried from step to
# step (test_parity.py measures up to 4.1e-7 relative over 100 steps).
TRAJECTORY_RTOL = 2e-6

needs_interpreter = pytest.mark.skipif(
    not triton_backend.runs_interpreted(), reason="runs the Triton kernel under its CPU interpreter (no CUDA here)"
)


@pytest.fixture
def launches(monkeypatch):
    """Every launch of the Triton kernel as (grid, keyword arguments); the launch itself still runs."""
    kernel = triton_backend._kernels().adam_step_kernel
    run = kernel.run  # what kernel[grid](...) calls, here and in a JITFunction on a GPU
    seen = []

    def recording(*args, grid, **kwargs):
        seen.append((grid, kwargs))
        return run(*args, grid=grid, **kwargs)

    monkeypatch.setattr(kernel, "run", recording)
    return seen


def _trajectory(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, steps: int, seed: str) -> None:
    generator = seeded_generator("tune", seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        optimizer.step()


@needs_interpreter
def test_a_launch_configuration_reaches_the_kernel_and_keeps_the_results(launches, monkeypatch):
    monkeypatch.setattr(tensor_table, "_tables", type(tensor_table._tables)())
    sizes, steps = (4097, 1000, 1), 6
    generator = seeded_generator("tune", "params")
    initial = [torch.randn(n, generator=generator) for n in sizes]
    ours = [p.clone().requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    options = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    optimizer = FusedAdamW(ours, **options, backend="triton")
    config = triton_backend.LaunchConfig(chunk=1024, block=256, num_warps=2)
    assert config != triton_backend.default_launch_config(CPU)
    with triton_backend.launch_config(config):
        assert triton_backend.current_launch_config(CPU) == config
        _trajectory(ours, optimizer, steps, "grads")
    assert triton_backend.current_launch_config(CPU) == triton_backend.default_launch_config(CPU)

    chunks = sum(math.ceil(n / config.chunk) for n in sizes)  # 5 + 1 + 1
    assert len(launches) == steps
    for grid, kwargs in launches:
        assert grid == (chunks,)
        assert (kwargs["CHUNK"], kwargs["BLOCK"], kwargs["num_warps"]) == (1024, 256, 2)
    assert {key[1] for key in tensor_table._tables} == {1024}, "tensor tables are built for the chunk in force"

    reference = torch.optim.AdamW(theirs, **options, foreach=False)
    _trajectory(theirs, reference, steps, "grads")
    for index, (param, expected) in enumerate(zip(ours, theirs, strict=True)):
        assert_close_relative(param, expected.detach().double(), f"param {index}", rtol=TRAJECTORY_RTOL)
        for name in ("exp_avg", "exp_avg_sq"):
            moment = reference.state[expected][name].double()
            assert_close_relative(optimizer.state[param][name], moment, f"{name} {index}", rtol=TRAJECTORY_RTOL)


@needs_interpreter
def test_eight_bit_moments_are_the_same_in_any_configuration_and_refuse_a_block_below_256(launches):
    """8-bit moments quantize in blocks of 256 whatever the block and chunk: two configurations, same bits."""
    generator = seeded_generator("tune", "8bit")
    initial = [torch.randn(n, generator=generator).to(torch.bfloat16) for n in (4396, 300)]  # 8-bit from 4096 up
    configs = [triton_backend.default_launch_config(CPU), triton_backend.LaunchConfig(512, 256, 4)]
    results = []
    for config in configs:
        params = [p.clone().requires_grad_() for p in initial]
        optimizer = FusedAdamW(params, lr=1e-2, state_dtype="8bit", backend="triton")
        with triton_backend.launch_config(config):
            _trajectory(params, optimizer, 2, "8bit grads")
        results.append([p.detach() for p in params] + [t for s in optimizer.state.values() for t in s.values()])
    chunks = [kwargs["CHUNK"] for _, kwargs in launches]  # per step: the quantized tensor, the small one
    assert chunks == [configs[0].chunk] * 4 + [512] * 4
    assert [kwargs["QUANTIZED"] for _, kwargs in launches].count(True) == 4
    for ours, theirs in zip(*results, strict=True):
        assert torch.equal(ours, theirs)
    with (
        pytest.raises(ValueError, match="multiple of 256"),
        triton_backend.launch_config(triton_backend.LaunchConfig(512, 128)),
    ):
        _trajectory(params, optimizer, 1, "8bit grads")


def test_an_override_holds_inside_its_block_only_and_nests():
    default = triton_backend.default_launch_config(CUDA)
    outer, inner = triton_backend.LaunchConfig(8192, 2048, 8), triton_backend.LaunchConfig(2048, 512)
    with triton_backend.launch_config(outer):
        with triton_backend.launch_config(inner):
            assert triton_backend.current_launch_config(CUDA) == inner
        assert triton_backend.current_launch_config(CUDA) == outer
        with pytest.raises(RuntimeError), triton_backend.launch_config(inner):
            raise RuntimeError
        assert triton_backend.current_launch_config(CUDA) == outer
    assert triton_backend.current_launch_config(CUDA) == default
    assert default == triton_backend.LaunchConfig(
        triton_backend._kernels().CHUNK, triton_backend._kernels().BLOCK, triton_backend.NUM_WARPS
    )


def test_eight_bit_launches_default_to_their_own_block_and_warps_over_the_same_chunks():
    """On a GPU the sweep found 8-bit moments faster at 512 elements an iteration with 4 warps, the others at
    1024 with 8: each launch takes its kind's default, over the chunks the step's tables share; an override
    applies to every launch."""
    kernels = triton_backend._kernels()
    plain = triton_backend.default_launch_config(CUDA)
    eight_bit = triton_backend.default_launch_config(CUDA, quantized=True)
    assert plain == triton_backend.LaunchConfig(kernels.CHUNK, kernels.BLOCK, triton_backend.NUM_WARPS)
    assert eight_bit == triton_backend.LaunchConfig(
        kernels.CHUNK, kernels.QUANTIZED_BLOCK, triton_backend.QUANTIZED_NUM_WARPS
    )
    assert eight_bit.block % 256 == 0
    override = triton_backend.LaunchConfig(8192, 2048, 8)
    with triton_backend.launch_config(override):
        assert triton_backend.current_launch_config(CUDA, quantized=True) == override
    assert triton_backend.default_launch_config(CPU, quantized=True) == triton_backend.default_launch_config(CPU)


def test_the_sweep_captures_launch_bound_cases_with_capturable_optimizers(monkeypatch):
    """The sweep times a launch-bound case as CUDA-graph replays: its optimizer must be capturable (the first
    GPU sweep built them with capturable=False, and every such case was refused). Here the capture is told to
    the optimizer (optim.is_capturing), which refuses a step that is not capturable."""
    from adam_gpu import optim
    from adam_gpu.bench import timing

    def captured(step, quick=False, repeat_ms=None):
        monkeypatch.setattr(optim, "is_capturing", lambda device: True)
        try:
            step()
        finally:
            monkeypatch.setattr(optim, "is_capturing", lambda device: False)
        return timing.Timing(1.0, 1.0, 1.0)

    monkeypatch.setattr(tune, "graph_timed", lambda case, device: case.tensors > 1)
    monkeypatch.setattr(timing, "time_graph", captured)
    run = tune.sweep(CPU, quick=True, backends=["triton"])
    graphed = [r for r in run.records if r.tensors > 1]
    assert graphed and all(r.status == OK and r.graph_median_ms == 1.0 for r in graphed), [r.reason for r in graphed]


@pytest.mark.parametrize(
    "values", [dict(chunk=1024, block=2048), dict(chunk=3000, block=1000), dict(chunk=4096, block=1024, num_warps=3)]
)
def test_triton_refuses_a_configuration_it_cannot_launch(values):
    with pytest.raises(ValueError):
        triton_backend.LaunchConfig(**values)


def test_cupy_configuration_checks_and_grid():
    cupy_backend = pytest.importorskip("adam_gpu.backends.cupy", reason="the cupy backend needs cupy installed")
    for values in (dict(chunk=100), dict(threads_per_block=48), dict(threads_per_block=2048), dict(blocks_per_sm=0)):
        with pytest.raises(ValueError):
            cupy_backend.LaunchConfig(**values)
    config = cupy_backend.LaunchConfig(blocks_per_sm=4)
    assert (config.grid(10, 132), config.grid(10_000, 132), config.grid(0, 132)) == (10, 528, 1)
    assert cupy_backend.default_launch_config(CUDA) == cupy_backend.LaunchConfig(
        cupy_backend.CHUNK, cupy_backend.THREADS_PER_BLOCK, cupy_backend.BLOCKS_PER_SM
    )
    # 8-bit moments' launches: their own threads a block (whole warps), over the same chunks; an override: every launch.
    eight_bit = cupy_backend.default_launch_config(CUDA, quantized=True)
    assert eight_bit == cupy_backend.LaunchConfig(
        cupy_backend.CHUNK, cupy_backend.QUANTIZED_THREADS_PER_BLOCK, cupy_backend.BLOCKS_PER_SM
    )
    assert eight_bit.threads_per_block % 32 == 0 and eight_bit != cupy_backend.default_launch_config(CUDA)
    with cupy_backend.launch_config(config):
        assert cupy_backend.current_launch_config(CUDA, quantized=True) == config


def test_full_grids_start_at_the_default_and_fit_the_time_on_an_h100():
    cupy_backend = pytest.importorskip("adam_gpu.backends.cupy", reason="the cupy backend needs cupy installed")
    grids = {
        "triton": tune.grid("triton", triton_backend, CUDA, quick=False),
        "cupy": tune.grid("cupy", cupy_backend, CUDA, quick=False),
    }
    assert (len(grids["triton"]), len(grids["cupy"])) == (33, 54)
    for name, module in (("triton", triton_backend), ("cupy", cupy_backend)):
        configs = grids[name]
        assert configs[0] == module.default_launch_config(CUDA) and len(set(configs)) == len(configs)
    assert all(c.block >= 128 * c.num_warps and c.chunk % c.block == 0 for c in grids["triton"])
    assert all(c.chunk % 256 == 0 for configs in grids.values() for c in configs), "8-bit moments need it"
    pairs = tune.tune_plan(quick=False)
    estimate = tune.SETUP_S + sum(tune.estimate_s(name, len(configs), pairs) for name, configs in grids.items())
    assert estimate < 7 * 60, f"the sweep is estimated at {estimate:.0f} s: prune the grids"


def _tune(*arguments: str) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": "160"}  # conftest's TRITON_INTERPRET=1 included: the Triton kernel runs
    command = [sys.executable, "-m", "adam_gpu.cli", "tune", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@needs_interpreter
def test_quick_sweep_writes_a_json_and_table_that_agree(tmp_path):
    result = _tune("--quick", "--device", "cpu", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    run = TuneRun.from_json(tmp_path / "tune.json")
    markdown = (tmp_path / "tune.md").read_text()
    assert run.environment["device_type"] == "cpu" and run.copy_gbps > 0 and run.elapsed_s > 0
    assert "Not a GPU measurement" in markdown
    assert tune_report.DEFAULTS_NOT_SWEPT["triton"] in markdown, "the 8-bit launches' own defaults are named"

    # cupy cannot run on the CPU: every pair says why, and nothing was planned.
    cupy = [r for r in run.records if r.backend == "cupy"]
    assert len(cupy) == len(tune.tune_plan(quick=True)) and "cupy" not in run.plan
    assert all(r.status == UNSUPPORTED and "CUDA devices" in r.reason for r in cupy)
    assert "cannot run here" in run.stopped["cupy"] and run.stopped["cupy"] in markdown

    # triton: the default (the interpreter's) and one other configuration, on every pair.
    default = dataclasses.asdict(triton_backend.default_launch_config(CPU))
    assert run.defaults["triton"] == run.plan["triton"][0] == default and len(run.plan["triton"]) == 2
    records = [r for r in run.records if r.backend == "triton"]
    assert all(r.status == OK for r in records), [r.reason for r in records if r.status != OK]
    assert sorted((r.case, r.policy, json.dumps(r.config)) for r in records) == sorted(
        (case.name, policy.name, json.dumps(config))
        for case, policy in tune.tune_plan(quick=True)
        for config in run.plan["triton"]
    )
    assert all(r.default_config == (r.config == default) for r in records)
    for r in records:
        assert 0 < r.p20_ms <= r.median_ms <= r.p80_ms and r.first_step_s > 0 and r.graph_median_ms is None
        assert r.gbps == pytest.approx(r.numel * r.bytes_per_param / (r.median_ms * 1e-3) / 1e9)
        assert r.pct_copy == pytest.approx(100 * r.gbps / run.copy_gbps)

    # The winner is the geometric mean of case-best / time, recomputed here from the JSON.
    cases = {(r.case, r.policy) for r in records}
    best = {pair: min(r.median_ms for r in records if (r.case, r.policy) == pair) for pair in cases}

    def score(config):
        ratios = [best[(r.case, r.policy)] / r.median_ms for r in records if r.config == config]
        return math.prod(ratios) ** (1 / len(ratios))

    winner = max(run.plan["triton"], key=score)
    assert tune_report.ranking(run, "triton")[0].score == pytest.approx(score(winner))
    assert f"Best overall: {tune_report.format_config(winner)}" in markdown
    assert "`kernels/adam_triton.py`: CHUNK = " in markdown
    assert f"triton: best overall {tune_report.format_config(winner)}" in " ".join(result.stdout.split())

    again = tmp_path / "again"
    again.mkdir()
    (again / "tune.json").write_text((tmp_path / "tune.json").read_text())
    assert tune_report.main_report(again / "tune.json") == 0  # what `adam-gpu tune --report` runs
    assert (again / "tune.md").read_text() == markdown


@needs_interpreter
def test_a_time_limit_measures_the_default_and_says_where_it_stopped(tmp_path):
    checkpoints = []
    run = tune.sweep(CPU, quick=True, backends=["triton"], time_limit_s=0, checkpoint=checkpoints.append)
    assert run.stopped["triton"] == "time limit: 1 of 2 configurations measured"
    assert {json.dumps(r.config) for r in run.records} == {json.dumps(run.defaults["triton"])}
    assert len(run.records) == len(tune.tune_plan(quick=True)) and checkpoints
    run.to_json(tmp_path / "tune.json")
    markdown = tune_report.markdown(TuneRun.from_json(tmp_path / "tune.json"))
    assert "Only 1 of the 2 planned configurations were measured" in markdown
    assert run.stopped["triton"] in markdown
