"""The compiled reused-step proof (adam_gpu/native_guards.py) tells exactly what the Python proof tells: the
suites of reused steps and of state changed between steps pass with it, and each change a kernel depends on makes
``Snapshot.holds`` refuse. Built with torch's C++ extension loader (about 30 s once); skipped without a compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from support import REPO_ROOT
from torch.utils.cpp_extension import is_ninja_available

from adam_gpu import native_guards

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available(),
    reason="no C++ compiler or no ninja to build the compiled snapshot with",
)


@pytest.fixture(scope="module")
def snapshot_type(request):
    """The compiled Snapshot class (built here whatever the environment says)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(native_guards.ENV_VAR, "1")
        native_guards.snapshot_type.cache_clear()
        built = native_guards.snapshot_type()
    native_guards.snapshot_type.cache_clear()
    assert built is not None, native_guards.build_error()
    return built


def _tensors():
    params = [torch.randn(n, requires_grad=True) for n in (3, 7)]
    state = [torch.randn(n) for n in (3, 7, 3, 7)] + [torch.zeros(()), torch.zeros(())]
    grads = [torch.randn(n) for n in (3, 7)]
    return params, state, grads


def test_holds_gives_the_grads_addresses_while_nothing_changed(snapshot_type):
    params, state, grads = _tensors()
    snapshot = snapshot_type(params + state, grads)
    assert snapshot.holds(params, grads) == tuple(g.data_ptr() for g in grads)
    new = [torch.randn(3), torch.randn(7)]  # other grads, alike: their addresses
    assert snapshot.holds(params, new) == tuple(g.data_ptr() for g in new)


CHANGES = {
    "param moved (.data =)": lambda p, s, g: setattr(p[0], "data", torch.randn(3)),
    "param resized in place": lambda p, s, g: p[1].data.resize_(2),
    "param transposed in place (same memory)": lambda p, s, g: setattr(p[0], "data", p[0].data.view(3, 1)),
    "another param object": lambda p, s, g: p.__setitem__(0, torch.randn(3, requires_grad=True)),
    "moment moved": lambda p, s, g: setattr(s[1], "data", torch.randn(7)),
    "moment re-typed": lambda p, s, g: setattr(s[2], "data", torch.randn(3, dtype=torch.float64)),
    "moment freed": lambda p, s, g: s.pop(3),
    "step count moved": lambda p, s, g: setattr(s[4], "data", torch.zeros(())),
    "grad of another dtype": lambda p, s, g: g.__setitem__(0, torch.randn(3, dtype=torch.bfloat16)),
    "grad of another shape": lambda p, s, g: g.__setitem__(1, torch.randn(7, 1)),
    "grad strided": lambda p, s, g: g.__setitem__(1, torch.randn(14)[::2]),
    "grad sparse": lambda p, s, g: g.__setitem__(0, torch.randn(3).to_sparse()),
    "grad nested": lambda p, s, g: g.__setitem__(0, torch.nested.nested_tensor([torch.randn(3)])),
    "grad requiring grad": lambda p, s, g: g.__setitem__(0, torch.randn(3, requires_grad=True)),
    "grad that is not a tensor": lambda p, s, g: g.__setitem__(0, 3.0),
    "a grad fewer": lambda p, s, g: g.pop(),
    "a param fewer": lambda p, s, g: p.pop(),
}


@pytest.mark.parametrize("change", CHANGES)
def test_holds_refuses_every_change_a_kernel_depends_on(snapshot_type, change):
    params, state, grads = _tensors()
    snapshot = snapshot_type(params + state, grads)
    params, grads = list(params), list(grads)
    CHANGES[change](params, state, grads)
    del state  # (a tensor popped from it is freed now)
    assert snapshot.holds(params, grads) is None


def test_reused_step_suites_pass_with_the_compiled_proof(snapshot_type):
    """tests/test_step_cache.py and tests/test_state_changes.py again, every signature a compiled one (conftest
    stops the run if it cannot be built)."""
    environment = {**os.environ, native_guards.ENV_VAR: "1"}
    files = ["tests/test_step_cache.py", "tests/test_state_changes.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
