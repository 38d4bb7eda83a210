"""``benchmarks/run_gpu.sh`` on the CPU: the one command a GPU session has (15 minutes of device time, the
machine's start included, 10 minutes a command, at most 8 files back) runs its three phases within its budget
and leaves exactly the 8 files it promises, whatever phase ran."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from adam_gpu.bench.records import Run
from adam_gpu.bench.tune import TuneRun

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run_gpu.sh"
LOGS = {"summary.md", "tests.log", "logs.tar.gz"}
RETURNED = LOGS | {"results.json", "results.md", "results.png", "tune.json", "tune.md"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")


def _run_gpu(out: Path, *phases: str, **env: str) -> subprocess.CompletedProcess:
    quick = "--quick --device cpu"  # a CPU has no GPU to benchmark: the pipeline in seconds
    environment = os.environ | {"TRITON_INTERPRET": "1", "RUN_GPU_BENCH_ARGS": quick, "RUN_GPU_TUNE_ARGS": quick,
                                "RUN_GPU_PROFILE_STEPS": "2"}  # fmt: skip
    return subprocess.run(["bash", str(SCRIPT), str(out), *phases], env=environment | env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-run")
    result = _run_gpu(out, "tests", "bench", "tune", RUN_GPU_TESTS="tests/test_reference.py tests/test_gpu.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_every_phase_leaves_the_8_files_the_device_tool_brings_back(whole_run):
    out, stdout = whole_run
    assert {path.name for path in out.iterdir()} == RETURNED
    with tarfile.open(out / "logs.tar.gz") as logs:
        # (wheels.log where the checkout has wheels in .whl/ for baselines the GPU image lacks)
        names = {"info.log", "profile.log", "tests.xml", "bench.log", "tune.log"}
        assert set(logs.getnames()) - {"wheels.log"} == names
    run, sweep = Run.from_json(out / "results.json"), TuneRun.from_json(out / "tune.json")
    assert run.records and sweep.records and sweep.plan["triton"]
    summary = (out / "summary.md").read_text()
    assert stdout.rstrip().endswith(summary.rstrip()), "the summary is printed last: the device tool returns the tail"
    for phase in ("tests", "bench", "tune"):
        assert f"- {phase}: exit 0" in summary
    assert re.search(r"\d+ passed", summary) and "## Targets" in summary and "triton: best overall" in summary
    assert re.search(r"\n\d+ needs a CUDA device", summary), "skips are counted by reason"
    # The host-time profiles: on a CPU the Triton launch is stubbed and cupy cannot run.
    assert re.search(r"- resnet-50 \(161 tensors.*backend triton, cpu: host [\d.]+ ms a step", summary), summary
    assert "- (resnet-50|cupy: exit 1)" in summary
    assert re.search(r"- flat 2\^20 \(1 tensors.*backend triton, cpu: host [\d.]+ ms a step", summary), summary


def test_phases_share_the_budget(whole_run):
    """The tests take at most 210 s (interrupted 20 s before, so they print their summary), less whatever the
    setup before them left short of the later phases' minimum (bench 150 s, tune 90 s) and 10 s for the summary;
    each later phase is killed before the 540 s budget runs out, less the later phases' minimum and the summary's
    10 s. (Relations, not fixed times: the setup takes longer on a loaded machine.)"""
    _, stdout = whole_run
    phases = {
        name: (int(start), int(kill))
        for name, start, kill in re.findall(r"== (\w+) at (\d+) s \(.*?(?:interrupted|killed) at (\d+) s\)", stdout)
    }
    assert list(phases) == ["tests", "bench", "tune"]
    tests_start, tests_interrupt = phases["tests"]
    bench_start, bench_kill = phases["bench"]
    tune_start, tune_kill = phases["tune"]
    # (the start is read just after the limit is set: a second may tick between them)
    assert tests_interrupt + 20 in {max(30, min(210, 290 - start)) for start in (tests_start - 1, tests_start)}
    assert bench_start + bench_kill in (539 - 90 - 10, 540 - 90 - 10) and tune_start + tune_kill in (529, 530)


def test_a_phase_alone_gets_the_whole_budget_and_leaves_its_files(tmp_path):
    result = _run_gpu(tmp_path, "tests", RUN_GPU_BUDGET_S="200", RUN_GPU_TESTS="tests/test_reference.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    start, interrupted = map(int, re.search(r"== tests at (\d+) s \(interrupted at (\d+) s\)", result.stdout).groups())
    assert start + interrupted in (199 - 10 - 20, 200 - 10 - 20)
    assert {path.name for path in tmp_path.iterdir()} == LOGS
    assert "- tests: exit 0" in (tmp_path / "summary.md").read_text()


def test_without_phases_named_it_runs_the_tests_and_the_whole_benchmark(tmp_path):
    """The sweep only where named: the benchmark then has the budget left after the tests, less 10 s."""
    result = _run_gpu(tmp_path, RUN_GPU_TESTS="tests/test_reference.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    starts = re.findall(r"== (\w+) at (\d+) s \(.*?(?:interrupted|killed) at (\d+) s\)", result.stdout)
    assert [name for name, _, _ in starts] == ["tests", "bench"]
    _, start, kill = starts[1]
    assert int(start) + int(kill) in (529, 530)
    summary = (tmp_path / "summary.md").read_text()
    assert "- tests: exit 0" in summary and "- bench: exit 0" in summary and "tune" not in summary
    assert {path.name for path in tmp_path.iterdir()} == RETURNED - {"tune.json", "tune.md"}


def test_an_unknown_phase_is_refused(tmp_path):
    result = _run_gpu(tmp_path, "benchmark")
    assert result.returncode == 2 and "unknown phase 'benchmark': tests, bench, tune" in result.stderr


# Test files that stay on CPU CI, and why: the rest of tests/ is run_gpu.sh's GPU list.
CPU_ONLY = {
    "test_aot_compile.py": "ahead-of-time compiles of the kernel sources (no device needed)",
    "test_cuda_compile.py": "NVRTC compiles of the CUDA C source",
    "test_cupy_launcher.py": "the CuPy launcher with the CUDA runtime faked",
    "test_packaging.py": "the wheel and the installed layout",
    "test_cli.py": "adam-gpu info's text",
    "test_bench.py": "adam-gpu bench --quick on the CPU (the GPU run benchmarks for real)",
    "test_bench_report.py": "tables and plots from synthetic records",
    "test_convergence_benchmark.py": "the optimizer comparison's pipeline, on the CPU",
    "test_host_overhead_benchmark.py": "host-time scripts with the launch stubbed",
    "test_tune.py": "adam-gpu tune --quick on the CPU (the GPU run sweeps for real)",
    "test_run_gpu.py": "this script itself",
    "test_parity.py": "examples/train_parity.py, a CPU training run",
    "test_distributed.py": "DDP, FSDP2 and ZeRO over gloo, in CPU processes",
    "test_cuda_host_sanitized.py": "the CUDA C kernel's host build under AddressSanitizer",
    "test_torch_cpu_chunks.py": "the torch backend's chunked path, which steps CPU tensors only",
    "test_native_guards.py": "the compiled reused-step proof, built and checked on the CPU",
    "test_storage_formats.py": "the storage-format registry against what the optimizer stores (torch backend, CPU)",
    "test_host_shim.py": "the host build's fp16 conversions, which only CPU builds use",
}


def test_every_test_file_is_on_the_gpu_list_or_named_cpu_only():
    """A new test file runs on the lent GPU unless it is named here as CPU-only, with the reason."""
    listed = re.search(r'gpu_tests="([^"]*)"', SCRIPT.read_text()).group(1).split()
    gpu = {Path(path).name for path in listed}
    every = {path.name for path in SCRIPT.parent.parent.joinpath("tests").glob("test_*.py")}
    assert len(listed) == len(gpu), "a file listed twice"
    assert not gpu & CPU_ONLY.keys(), "listed for the GPU and named CPU-only"
    assert every == gpu | CPU_ONLY.keys(), f"on neither list: {sorted(every - gpu - CPU_ONLY.keys())}"
