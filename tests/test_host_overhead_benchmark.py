"""benchmarks/host_overhead.py runs (in a child process, its kernel compiled for a stand-in driver), measures every
contender, and leaves the Triton backend as it found it."""

from __future__ import annotations

import torch
from support import import_script

from adam_gpu import FusedAdamW
from adam_gpu.backends import triton as triton_backend

host_overhead = import_script("benchmarks/host_overhead.py")


def test_quick_run_times_every_contender_and_restores_the_kernel():
    kernel_before = triton_backend._kernels().adam_step_kernel
    cuda_before = torch.cuda.current_stream, torch.cuda.current_device
    rows = host_overhead.main(["--quick"])
    optimizers = [
        host_overhead.ADAM_GPU,
        host_overhead.CUPY,
        "torch AdamW fused",
        "torch AdamW foreach",
        "torch AdamW for-loop",
    ]
    if host_overhead._native_buildable():  # (the compiled reused-step proof, where it builds)
        optimizers.append(host_overhead.NATIVE)
    assert [(row["grads"], row["optimizer"]) for row in rows] == [
        (grads, optimizer) for grads in ("kept", "new each step") for optimizer in optimizers
    ]
    assert all(row["tensors"] == 10 and row["ms"] > 0 and row["us_per_tensor"] > 0 for row in rows)
    assert triton_backend._kernels().adam_step_kernel is kernel_before
    assert (torch.cuda.current_stream, torch.cuda.current_device) == cuda_before, "the CuPy stub was left in place"
    # The real kernel runs again afterwards (under the interpreter here): a step changes the param.
    param = torch.randn(5, requires_grad=True)
    param.grad = torch.randn(5)
    before = param.detach().clone()
    FusedAdamW([param], lr=1e-2, backend="triton").step()
    assert not torch.equal(param.detach(), before)


def test_quick_compiled_run_also_times_the_compiled_steps():
    rows = host_overhead.main(["--quick", "--compiled"])
    compiled = [host_overhead.COMPILED.format(name) for name in (host_overhead.ADAM_GPU, "torch AdamW fused")]
    timed = {row["optimizer"] for row in rows if row["ms"] > 0}
    contenders = 7 + host_overhead._native_buildable()
    assert set(compiled) <= timed and len(rows) == 2 * contenders


profile_step = import_script("benchmarks/profile_step.py")


def test_the_step_profile_times_and_lists_where_the_host_time_goes():
    kernel_before = triton_backend._kernels().adam_step_kernel
    report = profile_step.main(["--case", "1000x4096", "--steps", "2", "--top", "5", "--device", "cpu"])
    assert report.startswith("1000x4096 (1000 tensors, 4,096,000 elements), fp32, backend triton, cpu: host ")
    assert "ms a step (median of 2; the thread's CPU time " in report and "garbage collections" in report
    assert report.count("Ordered by: internal time") == 1 and report.count("Ordered by: cumulative time") == 1
    assert "torch.profiler over 2 steps" in report and "Optimizer.step#FusedAdamW.step" in report
    assert "optim.py" in report, "the optimizer's own functions are listed"
    assert triton_backend._kernels().adam_step_kernel is kernel_before
