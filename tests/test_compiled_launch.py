"""Launches through Triton's compiled launcher (adam_gpu/backends/compiled_launch.py) pass the compiled kernel the
very arguments ``kernel[grid]`` passes it, and a launch of another kind (specialization, constexprs) compiles anew.

Triton compiles for an sm_90 target without a GPU; benchmarks/host_overhead.py's stand-in driver loads the kernel
and records each launcher call instead of launching. That needs the kernel module compiled (TRITON_INTERPRET=0),
so the steps run in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import REPO_ROOT

pytest.importorskip("triton")

CHILD = r"""
import json, sys
import torch
sys.path.insert(0, "benchmarks")
import host_overhead
from adam_gpu import FusedAdam, FusedAdamW
from adam_gpu.backends import compiled_launch, triton as triton_backend

calls = []  # every launcher call: (how, its arguments)
how = ["run"]
original = compiled_launch.CompiledLaunches.__call__
report = {"direct": 0, "run": 0, "mismatches": [], "kinds": 0}

def comparable(call):
    # (launch_metadata and the hooks: None for a direct call where nothing is hooked; run passes empty chains)
    head, tail = call[:6], call[9:]
    tensor = torch.Tensor
    return [("tensor", a.data_ptr(), a.dtype, a.shape) if isinstance(a, tensor) else a for a in head + tail]

def checked(self, grid, device_index, args, scalars, constexprs, options):
    key_count = len(self._compiled)
    before = len(calls)
    original(self, grid, device_index, args, scalars, constexprs, options)
    direct = len(self._compiled) == key_count
    report["direct" if direct else "run"] += 1
    if direct:  # the same launch through Triton's run must make the same launcher call
        self._kernel[(grid,)](*args, *scalars, **constexprs, **dict(options))
        if comparable(calls[before]) != comparable(calls[-1]):
            report["mismatches"].append(str(constexprs))
    report["kinds"] = len(self._compiled)

compiled_launch.CompiledLaunches.__call__ = checked

def steps(optimizer, params, count=3):
    for _ in range(count):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()

with host_overhead.stub_triton_driver() as stub:
    stub.launcher_cls = lambda source, metadata: (lambda *args: calls.append(args))
    fp32 = [torch.randn(n, requires_grad=True) for n in (1, 4097, 255)]
    steps(FusedAdamW(fp32, lr=1e-3, weight_decay=0.1, backend="triton"), fp32)
    bf16 = [torch.randn(n, dtype=torch.bfloat16, requires_grad=True) for n in (3, 17)]
    steps(FusedAdam(bf16, lr=1e-3, amsgrad=True, maximize=True, backend="triton"), bf16)
    one = [torch.randn(31, requires_grad=True)]  # (one tensor: Triton specializes n_tensors == 1)
    steps(FusedAdamW(one, lr=1e-3, state_dtype=torch.bfloat16, backend="triton"), one)
    big = [torch.randn(5000, dtype=torch.bfloat16, requires_grad=True) for _ in range(16)]
    steps(FusedAdamW(big, lr=1e-3, state_dtype="8bit", backend="triton"), big)
report["supported"] = compiled_launch.direct_calls_supported()
print(json.dumps(report))
"""


def test_direct_launches_pass_what_kernel_grid_passes_and_new_kinds_compile():
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["supported"], "this Triton's JITFunction.run no longer ends in the launch compiled_launch makes"
    assert report["mismatches"] == []
    # Four kinds (dtypes, options, one tensor vs several, 8-bit) compiled through run, every later launch direct.
    assert report["kinds"] == 4 and report["run"] == 4 and report["direct"] == 4 * 2
