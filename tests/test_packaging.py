"""The package as shipped: the wheel carries the kernels, importing adam_gpu has no side effects, and the
package needs torch only (rich and matplotlib are the benchmark's, in the bench extra).

The top-level ``kernels/`` folder ships as ``adam_gpu.kernels`` through a setuptools package-dir mapping, which
an editable install hides (it maps the folder at run time), so the wheel itself is built and inspected here.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNEL_SUFFIXES = (".py", ".cu", ".cuh")
# Building in place would leave build/ in the checkout, and a stale build/lib ships modules deleted since:
# the wheel is built from a copy without the build outputs. Copy + build take about 1 s here.
BUILD_OUTPUTS = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".venv*"
)
BUILD_TIMEOUT_S = 60


def kernel_sources() -> list[str]:
    """Every kernel source under the repo's ``kernels/``, relative to it: computed, so a new .cu is covered."""
    folder = REPO_ROOT / "kernels"
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.suffix in KERNEL_SUFFIXES and "__pycache__" not in path.parts
    )


def top_level_kernel_sources() -> set[str]:
    """The sources directly in ``kernels/``: what ``importlib.resources.files("adam_gpu.kernels")`` lists."""
    return {name for name in kernel_sources() if "/" not in name}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a clean copy of the repo, offline and without build isolation (< 60 s)."""
    source = tmp_path_factory.mktemp("source") / "adam-gpu"
    shutil.copytree(REPO_ROOT, source, ignore=BUILD_OUTPUTS)
    out_dir = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    result = subprocess.run(
        [*command, "-w", str(out_dir), str(source)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    (built,) = out_dir.glob("adam_gpu-*.whl")
    return built


def test_wheel_ships_every_kernel_source(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    expected = {
        "adam_gpu/kernels/__init__.py",
        "adam_gpu/kernels/adam_triton.py",
        *(f"adam_gpu/kernels/{name}" for name in kernel_sources()),
    }
    missing = sorted(expected - names)
    assert not missing, f"{wheel.name} lacks {missing}; it holds {sorted(names)}"


def test_wheel_declares_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    lines = [line.replace(" ", "") for line in text.splitlines()]
    console_scripts = lines[lines.index("[console_scripts]") + 1 :]
    assert "adam-gpu=adam_gpu.cli:main" in console_scripts, text


def test_unpacked_wheel_imports_kernels(wheel: Path, tmp_path: Path) -> None:
    """The wheel's files on PYTHONPATH (ahead of the editable install) import and list the kernels."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    script = (
        "import importlib.resources, json, adam_gpu.kernels.adam_triton as k; "
        "print(json.dumps({'file': k.__file__, "
        "'resources': sorted(p.name for p in importlib.resources.files('adam_gpu.kernels').iterdir())}))"
    )
    # The interpreter imports the kernel module without a GPU.
    env = os.environ | {"PYTHONPATH": str(site), "TRITON_INTERPRET": "1"}
    # cwd elsewhere: ``python -c`` puts the working directory first on sys.path, and the checkout would win.
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert Path(report["file"]).is_relative_to(site), f"imported {report['file']}, not the wheel's copy"
    assert top_level_kernel_sources() <= set(report["resources"]), report


# Run in a fresh interpreter: triton, cupy or a kernel module in sys.modules afterwards was loaded eagerly.
IMPORT_SIDE_EFFECTS = """
import json, sys
import torch
import adam_gpu
eager = [m for m in sys.modules if m.split(".")[0] in ("triton", "cupy") or m.startswith("adam_gpu.kernels.")]
print(json.dumps({"modules": sorted(eager), "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_import_has_no_side_effects() -> None:
    """Importing adam_gpu imports no kernel, no triton or cupy, and touches no GPU (in a fresh interpreter)."""
    result = subprocess.run([sys.executable, "-c", IMPORT_SIDE_EFFECTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["modules"] == [], f"import adam_gpu imported {report['modules']}"
    assert report["cuda_initialized"] is False


def test_kernel_sources_are_package_resources() -> None:
    names = {path.name for path in importlib.resources.files("adam_gpu.kernels").iterdir()}
    assert "adam_triton.py" in names
    assert top_level_kernel_sources() <= names


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11 on)
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def test_package_depends_on_torch_only_and_the_test_extra_brings_the_benchmarks() -> None:
    project = _project()
    assert {Requirement(line).name for line in project["dependencies"]} == {"torch"}, project["dependencies"]
    extras = project["optional-dependencies"]
    assert {Requirement(line).name for line in extras["bench"]} >= {"rich", "matplotlib"}
    missing = set(extras["bench"]) - set(extras["test"])
    assert not missing, f"the tests run the benchmark, but the test extra lacks {sorted(missing)}"


# Run in a fresh interpreter with the bench extra's packages (its arguments) made unimportable, as where they are
# not installed.
BENCH_ONLY = ("rich", "matplotlib")
WITHOUT_BENCH_EXTRA = """
import contextlib, io, json, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in sys.argv[1:]:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)

sys.meta_path.insert(0, Blocked())
import torch
import adam_gpu
from adam_gpu import cli

param = torch.randn(10, requires_grad=True)
param.grad = torch.randn(10)
optimizer = adam_gpu.FusedAdamW([param], lr=1e-2)
optimizer.step()
report = {"backends": optimizer.selected_backends}
for argv in (["info"], ["--help"], ["bench", "--quick"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            report[argv[0]] = cli.main(argv)
        except SystemExit as exit:
            report[argv[0]] = exit.code
    report[argv[0] + " output"] = out.getvalue()
report["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1:])
print(json.dumps(report))
"""


def test_adam_gpu_imports_steps_and_says_info_without_the_bench_extra() -> None:
    """Without rich and matplotlib, ``import adam_gpu``, a step, ``adam-gpu info`` and ``--help`` work; ``adam-gpu
    bench`` stops with a message naming the extra."""
    env = {key: value for key, value in os.environ.items() if key != "ADAM_GPU_BACKEND"}
    command = [sys.executable, "-c", WITHOUT_BENCH_EXTRA, *BENCH_ONLY]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["backends"] == ["torch"], report
    assert report["info"] == 0 and "torch" in report["info output"], report
    assert report["--help"] == 0 and "bench" in report["--help output"], report
    assert "needs rich, from the bench extra: pip install 'adam-gpu[bench]'" in str(report["bench"]), report
    assert report["loaded"] == [], report
