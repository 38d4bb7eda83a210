"""``adam-gpu bench --quick`` on this machine (the CPU on CI): JSON, table and plot are written and agree."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

from adam_gpu.bench.cases import POLICIES, gpt2_124m, llama_3_2_1b, many_small, plan, resnet_50
from adam_gpu.bench.contenders import contenders
from adam_gpu.bench.records import OK, TOO_SLOW, Record, Run
from adam_gpu.bench.run import state_bytes_per_param


def _bench(*arguments: str) -> subprocess.CompletedProcess:
    # Without TRITON_INTERPRET, as a user runs it: the Triton kernel is then unavailable on the CPU.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"} | {"COLUMNS": "160"}
    command = [sys.executable, "-m", "adam_gpu.cli", "bench", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = _bench("--quick", "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


def test_quick_run_writes_json_table_and_plot(quick_run):
    out, stdout = quick_run
    run = Run.from_json(out / "results.json")
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    markdown = (out / "results.md").read_text()
    assert "GPU kernels were not measured" in markdown
    assert "GPU kernels (triton, cupy) were not measured" in " ".join(stdout.split())
    assert len(run.records) == len(plan(True, "cpu")) * len(contenders())
    assert run.copy_gbps > 0 and run.environment["device_type"] == "cpu"
    for record in run.records:
        assert record.case in markdown and record.contender in markdown


def test_quick_run_measures_the_torch_backend_against_torch_optim(quick_run):
    out, _ = quick_run
    run = Run.from_json(out / "results.json")
    measured = {r.contender for r in run.records if r.status == OK}
    assert {"adam-gpu torch", "torch for-loop", "torch foreach", "torch fused"} <= measured
    assert not measured & {"adam-gpu triton", "adam-gpu cupy"}, "GPU kernels are not timed on the CPU"
    medians = {(r.case, r.policy, r.contender): r.median_ms for r in run.records}
    for record in run.records:
        if record.status != OK:
            assert record.reason, f"{record.contender} on {record.case}: a record that was not measured says why"
            assert record.seconds is None
            continue
        assert 0 < record.p20_ms <= record.median_ms <= record.p80_ms
        assert record.seconds > record.median_ms * 1e-3, "the time its measurement took, for planning runs"
        assert record.bytes_per_param == POLICIES[record.policy].bytes_per_param()
        expected_gbps = record.numel * record.bytes_per_param / (record.median_ms * 1e-3) / 1e9
        assert record.gbps == pytest.approx(expected_gbps)
        assert record.pct_copy is None, "the CPU's copy bandwidth is no roofline of its steps"
        policy = POLICIES[record.policy]
        master = {False: 0, True: 4, "lean": 2}[policy.master_weights]
        assert record.state_bytes_per_param == pytest.approx(2 * policy.moment_bytes + master, rel=0.05)
        fused = medians[(record.case, record.policy, "torch fused")]
        if fused is not None:
            assert record.speedup_vs_torch_fused == pytest.approx(fused / record.median_ms)


def test_quick_run_logs_a_line_per_pair_when_not_on_a_terminal(quick_run):
    """Its output is a pipe here, as in a log file: the progress bar draws nothing, the log lines stay."""
    out, stdout = quick_run
    run = Run.from_json(out / "results.json")
    pairs = plan(True, "cpu")
    logged = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(logged) == len(pairs)
    for line, (case, policy) in zip(logged, pairs, strict=True):
        measured = sum(r.status == OK for r in run.records if (r.case, r.policy) == (case.name, policy.name))
        assert f"] {case.name}, {policy.name}: {measured} measured" in line and line.endswith(" s)")
    assert f"{len(pairs)} (case, policy) pairs x {len(contenders())} contenders" in stdout
    assert "adam-gpu bench on" in stdout and "done in " in stdout


def test_quick_run_redraws_from_json(quick_run, tmp_path):
    out, _ = quick_run
    copy = tmp_path / "again.json"
    copy.write_text(json.dumps(json.loads((out / "results.json").read_text())))
    result = _bench("--report", str(copy))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "again.md").read_text() == (out / "results.md").read_text()
    assert (tmp_path / "again.png").read_bytes().startswith(b"\x89PNG")


def test_model_shapes_are_the_published_ones():
    """Parameter counts as published: GPT-2 small, Llama-3.2-1B (tied embeddings), torchvision ResNet-50."""
    assert (gpt2_124m().tensors, gpt2_124m().numel) == (148, 124_439_808)
    assert (llama_3_2_1b().tensors, llama_3_2_1b().numel) == (146, 1_235_814_400)
    assert (resnet_50().tensors, resnet_50().numel) == (161, 25_557_032)
    assert (many_small().tensors, many_small().numel) == (1000, 4_096_000)


def test_bytes_per_param_of_each_policy():
    moved = {name: policy.bytes_per_param() for name, policy in POLICIES.items()}
    assert moved == {
        "fp32": 28,
        "bf16": 14,
        "bf16+fp32-moments": 22,
        "fp32+bf16-moments": 20,
        "bf16+8bit-moments": pytest.approx(10.0625),
        "bf16+fp32-moments+fp32-master": 28,
        "bf16+fp32-moments+lean-master": 26,
    }


def test_resident_bytes_per_param_of_each_policy():
    """What a set holds (sizing the input sets), not what a step moves: each moment is stored once."""
    held = {name: policy.resident_bytes_per_param() for name, policy in POLICIES.items()}
    assert held == {
        "fp32": 16,
        "bf16": 8,
        "bf16+fp32-moments": 12,
        "fp32+bf16-moments": 12,
        "bf16+8bit-moments": pytest.approx(6.03125),
        "bf16+fp32-moments+fp32-master": 16,
        "bf16+fp32-moments+lean-master": 14,
    }


def test_8bit_optimizers_are_measured_on_the_8bit_policy_only():
    """bitsandbytes and torchao keep 8-bit moments whatever the policy: timed as fp32 or bf16 they would be
    compared with optimizers that move four or two times the bytes."""
    cuda = torch.device("cuda")
    for contender in contenders():
        installed = dataclasses.replace(contender, requires=None)  # as if installed
        runs = {name for name, policy in POLICIES.items() if installed.unavailable(cuda, policy) is None}
        if contender.name.endswith("AdamW8bit"):
            assert runs == {"bf16+8bit-moments"}, contender.name
        elif contender.family == "torch":
            assert runs == {"fp32", "bf16"}, contender.name


def test_adam_gpu_contenders_are_capturable_when_graphed():
    """The CUDA-graph timing builds its optimizer with capturable=True: lr and step counts on the device."""
    (contender,) = [c for c in contenders() if c.name == "adam-gpu torch"]
    params = [torch.zeros(3, requires_grad=True)]
    assert contender.make(params, POLICIES["fp32"], True).param_groups[0]["capturable"] is True
    assert contender.make(params, POLICIES["fp32"], False).param_groups[0]["capturable"] is False


def test_plan_puts_the_headline_pairs_first():
    """A run stopped by its time limit keeps what the targets are read from: fp32 on every case (model lists,
    then flat tensors from the largest down), then bf16, then the other policies on the model lists."""
    pairs = [(case.name, policy.name) for case, policy in plan(False, "cuda")]
    assert len(pairs) == len(set(pairs)) == 4 * 7 + 10 * 2
    assert [p for _, p in pairs[:14]] == ["fp32"] * 14 and [p for _, p in pairs[14:28]] == ["bf16"] * 14
    first = ["gpt2-124m", "llama-3.2-1b", "resnet-50", "1000x4096", "flat 2^30", "flat 2^28"]
    assert [c for c, _ in pairs[:6]] == first
    assert pairs[28] == ("gpt2-124m", "bf16+8bit-moments")


def test_a_run_of_some_cases_or_policies_keeps_their_pairs_in_order_and_refuses_unknown_names():
    pairs = plan(False, "cuda")
    only = ["resnet-50", "flat 2^20"]
    assert plan(False, "cuda", only) == [(case, policy) for case, policy in pairs if case.name in only]
    assert len(plan(False, "cuda", only)) == 2 + len(POLICIES)  # a flat tensor: fp32, bf16; a model list: all
    with pytest.raises(ValueError, match=r"unknown case gpt-5: the case names of this plan are gpt2-124m, "):
        plan(False, "cuda", ["gpt2-124m", "gpt-5"])
    policies = ["bf16", "fp32+bf16-moments"]
    assert plan(False, "cuda", only, policies) == [(c, p) for c, p in pairs if c.name in only and p.name in policies]
    assert [p.name for _, p in plan(False, "cuda", None, ["fp32+bf16-moments"])] == ["fp32+bf16-moments"] * 4
    with pytest.raises(ValueError, match=r"unknown policy fp8: the policy names of this plan are fp32, bf16, "):
        plan(False, "cuda", None, ["fp8"])


def test_time_limit_measures_the_first_pair_and_lists_the_rest():
    from adam_gpu.bench import report
    from adam_gpu.bench.run import benchmark

    run = benchmark(torch.device("cpu"), quick=True, time_limit_s=0)
    pairs = plan(True, "cpu")
    first = f"{pairs[0][0].name}, {pairs[0][1].name}"
    assert {f"{r.case}, {r.policy}" for r in run.records} == {first}
    assert run.not_measured == [f"{case.name}, {policy.name}" for case, policy in pairs[1:]]
    assert any(r.status == OK for r in run.records) and run.elapsed_s > 0
    markdown = report.markdown_table(run)
    assert f"stopped by its time limit (0 s): {len(pairs) - 1} (case, policy) pairs not measured" in markdown
    assert run.not_measured[-1] in markdown


def test_state_bytes_count_what_a_tensor_subclass_wraps():
    """torchao's 8-bit state is a wrapper subclass that looks like fp32: its bytes are those of the tensors it
    wraps (named by __tensor_flatten__), as for torch's own two-tensor test subclass here."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    wrapped = two_tensor.TwoTensor(torch.randn(100), torch.randn(100))
    optimizer = torch.optim.AdamW([torch.zeros(100, requires_grad=True)])
    optimizer.state[0] = {"step": torch.tensor(1.0), "exp_avg": wrapped, "exp_avg_sq": torch.zeros(100)}
    assert state_bytes_per_param(optimizer, 100) == 2 * 4 + 4


def test_host_time_takes_fewer_samples_of_a_slow_step():
    from adam_gpu.bench import timing

    calls = []
    assert timing.time_host(lambda: calls.append(1), torch.device("cpu")) >= 0
    assert len(calls) == timing.HOST_STEPS
    calls.clear()
    slow_s = 1.2 * timing.HOST_MS / timing.HOST_MIN_STEPS / 1e3
    assert timing.time_host(lambda: calls.append(time.sleep(slow_s)), torch.device("cpu")) >= slow_s * 1e3
    assert len(calls) == timing.HOST_MIN_STEPS


def test_a_folder_that_holds_a_run_is_refused_without_force(quick_run):
    out, _ = quick_run
    before = (out / "results.json").read_bytes()
    result = _bench("--quick", "--device", "cpu", "--out", str(out))
    assert result.returncode != 0 and "holds a run already: pass --force" in result.stdout + result.stderr
    assert (out / "results.json").read_bytes() == before


def test_runs_by_default_each_get_a_new_folder(tmp_path):
    from adam_gpu.bench.command import output_folder

    first = output_folder(None, False, "2026-12-02-cpu", root=tmp_path)
    first.mkdir()
    second = output_folder(None, False, "2026-12-02-cpu", root=tmp_path)
    assert (first.name, second.name) == ("2026-12-02-cpu", "2026-12-02-cpu-2")
    (tmp_path / "given").mkdir()
    (tmp_path / "given" / "results.json").write_text("{}")
    assert output_folder(tmp_path / "given", True, "unused") == tmp_path / "given"


def test_memory_budget_comes_from_the_machines_free_memory(tmp_path, monkeypatch):
    from adam_gpu.bench import memory
    from adam_gpu.bench.run import MEMORY_SHARE, input_sets

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   21000000 kB\n")
    assert memory.meminfo_available(meminfo) == 21_000_000 * 1024
    assert memory.meminfo_available(tmp_path / "absent") is None
    meminfo.write_text("MemTotal:       24000000 kB\n")
    assert memory.meminfo_available(meminfo) is None
    assert memory.free_bytes(torch.device("cpu")) > 0
    case, policy = many_small(4, 1000), POLICIES["fp32"]
    need = 2 * case.numel * policy.resident_bytes_per_param()
    refused = input_sets(case, policy, torch.device("cpu"), lambda device: int(need / MEMORY_SHARE) - 1000)
    assert isinstance(refused, str) and refused.startswith("needs 0.0 GiB")
    sets = input_sets(case, policy, torch.device("cpu"), lambda device: int(need / MEMORY_SHARE) + 1000)
    assert len(sets) == 1 and [p.numel() for p in sets[0]] == [1000] * 4
    if importlib.util.find_spec("psutil") is None:
        monkeypatch.setattr(memory, "meminfo_available", lambda: 12345)
        assert memory.host_available() == 12345
        monkeypatch.setattr(memory, "meminfo_available", lambda: None)  # no MemAvailable, no psutil: the fallback
        assert memory.host_available() == memory.FALLBACK_BYTES


def test_planned_steps_count_warm_up_timed_and_host_samples():
    from adam_gpu.bench import timing

    slow = 1e4  # ms: every loop stops at its minimum
    assert timing.planned_steps(slow) == 1 + timing.MIN_SAMPLES + timing.HOST_MIN_STEPS
    assert timing.planned_steps(1.0) == 1 + timing.REPEAT_MS + timing.HOST_STEPS
    assert timing.planned_steps(1.0, quick=True) == 1 + timing.QUICK_REPEAT_MS + timing.HOST_STEPS


def test_case_time_limit_judges_the_first_step():
    from adam_gpu.bench import timing
    from adam_gpu.bench.run import TooSlow, check_time

    steps = 2 + timing.planned_steps(2000.0)  # three input sets: two more first steps
    check_time(2.0, 3, False, None)
    check_time(2.0, 3, False, 2.0 * steps + 0.01)
    with pytest.raises(TooSlow, match=rf"first step 2.00 s: {steps} more would take about {2 * steps} s, over"):
        check_time(2.0, 3, False, 2.0 * steps - 0.01)


def test_a_measurement_over_the_case_time_limit_is_skipped_and_reported():
    from adam_gpu.bench import report
    from adam_gpu.bench.run import benchmark

    lines = []
    run = benchmark(torch.device("cpu"), True, only=["flat 2^12"], case_time_limit_s=1e-9, log=lines.append)
    assert run.case_time_limit_s == 1e-9 and len(run.records) == 2 * len(contenders())
    slow = [r for r in run.records if r.status == TOO_SLOW]
    assert {r.contender for r in slow} == {"torch for-loop", "torch foreach", "torch fused", "adam-gpu torch"}
    assert all(r.reason.startswith("first step ") and r.median_ms is None for r in slow)
    assert len(lines) == 2 and "too slow: torch for-loop, torch foreach, torch fused, adam-gpu torch" in lines[0]
    markdown = report.markdown_table(run)
    assert "*too slow: first step " in markdown and "case time limit 0 s" in markdown


def test_the_cpu_default_plan_is_short_and_the_full_one_behind_an_option():
    default = [(c.name, p.name) for c, p in plan(False, "cpu", full=False)]
    full = [(c.name, p.name) for c, p in plan(False, "cpu")]
    assert {c for c, _ in default} == {"resnet-50", "1000x4096", "flat 2^24", "flat 2^20", "flat 2^16", "flat 2^12"}
    assert len(default) == 6 * 2 + 2 * (len(POLICIES) - 2) and set(default) < set(full)
    assert "gpt2-124m" in {c for c, _ in full} and "llama-3.2-1b" not in {c for c, _ in full}
    assert plan(False, "cuda") == plan(False, "cuda", full=False), "a GPU run is always full"
    named = plan(False, "cpu", ["gpt2-124m"], ["fp32"], full=False)
    assert [c.name for c, _ in named] == ["gpt2-124m"], "cases named: of the full plan"


def test_a_cpu_run_is_limited_by_default_and_full_on_request(tmp_path, monkeypatch):
    import argparse

    from adam_gpu.bench import command

    seen = []

    def fake_benchmark(device, quick, progress, **options):
        seen.append(options)
        return Run({"device": "cpu", "device_type": "cpu"}, 1.0, elapsed_s=0.0)

    threads = []
    monkeypatch.setattr(command, "benchmark", fake_benchmark)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # this process's own threads stay as they are
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    console = Console(file=io.StringIO(), width=100)
    options = ([], ["--full", "--threads", "2"], ["--time-limit", "20", "--case-time-limit", "0", "--threads", "0"])
    for number, extra in enumerate(options):
        args = parser.parse_args(["--device", "cpu", "--out", str(tmp_path / str(number)), *extra])
        assert command.run_command(args, console) == 0
    assert [(o["time_limit_s"], o["case_time_limit_s"], o["full"]) for o in seen] == [
        (command.CPU_TIME_LIMIT_S, command.CASE_TIME_LIMIT_S, False),
        (None, command.CASE_TIME_LIMIT_S, True),
        (20.0, None, False),
    ]
    assert threads == [command.CPU_THREADS, 2], "one thread by default; 0 leaves torch's own"
    assert "about 3 minutes on 2 cores (--full: the full CPU sweep" in console.file.getvalue()


def test_the_summary_fits_100_columns_with_every_policy_whole():
    from adam_gpu.bench import command

    records = []
    for index, policy in enumerate(POLICIES):
        for contender, family in (("torch fused", "torch"), ("adam-gpu triton", "adam-gpu")):
            median = 123.456 if contender == "torch fused" else 1.234 + index
            records.append(
                Record(contender, family, "llama-3.2-1b", policy, 1_235_814_400, 146, median_ms=median,
                       p20_ms=median * 0.5, p80_ms=median * 2, gbps=12345.0, pct_copy=100.0,
                       speedup_vs_torch_fused=123.45)
            )  # fmt: skip
    run = Run({"device": "NVIDIA H200", "device_type": "cuda"}, 4250.0, records)
    console = Console(file=io.StringIO(), width=command.SUMMARY_WIDTH)
    console.print(command.summary(run))
    lines = console.file.getvalue().splitlines()
    assert max(map(len, lines)) <= command.SUMMARY_WIDTH
    for policy in POLICIES:
        assert any(f" {policy} " in line for line in lines), policy
    assert "150 %*" in console.file.getvalue() and "123.45x*" in console.file.getvalue()
