"""FusedAdamW under torch.distributed wrappers: DDP, FSDP2 (``fully_shard``, DTensor params whose local
shards the kernels update) and ``ZeroRedundancyOptimizer(optimizer_class=FusedAdamW)``.

Two ranks on the CPU (gloo) run tests/distributed_worker.py once for all cases and backends; every rank's
final full params and optimizer state are compared with the same wrapper driving torch.optim.AdamW.
Tolerance: both sides compute in fp32 and differ only in the order of a few roundings per step (a few ulp,
6e-8 each), so after 6 steps they agree within FP32_RTOL (1e-6) of each tensor's largest magnitude, the bound
the single-process trajectory tests (tests/test_training.py) use too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_worker import CASES, MAX_GRAD_NORM, STEPS
from support import BACKEND_NAMES, FP32_RTOL, assert_close_relative

from adam_gpu import dispatch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORLD = 2
TIMEOUT_S = 300  # both ranks together; a hang in a collective fails after COLLECTIVE_TIMEOUT (60 s) anyway
CPU = torch.device("cpu")
# How far (relative to the comparison's tolerance) torch.optim must have moved each param from its initial
# value, so that an optimizer that does nothing (or a run in which torch.optim did nothing too) fails.
MOVED = 100


def _cpu_backends() -> dict[str, str | None]:
    """Backend name -> why it cannot run fp32 on the CPU (None: it can). The ranks run on the CPU."""
    return {name: dispatch.unavailable_reason(name, CPU, [torch.float32]) for name in BACKEND_NAMES}


def _backend_params() -> list:
    """One pytest param per backend, skipped with the dispatcher's reason where it cannot run on the CPU."""
    return [
        pytest.param(name, id=name, marks=[pytest.mark.skip(reason=f"backend {name} unavailable: {why}")] * bool(why))
        for name, why in _cpu_backends().items()
    ]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Each rank's results (distributed_worker.main), from one run of both ranks over all cases and backends."""
    out = tmp_path_factory.mktemp("distributed")
    backends = ",".join(name for name, why in _cpu_backends().items() if why is None)
    # This checkout first (an editable install elsewhere must not win); tests/ for support.py; one thread
    # per rank, since the ranks share the machine's cores.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are imported (tests/conftest.py)
    logs = [out / f"rank{rank}.log" for rank in range(WORLD)]
    processes = []
    for rank, log in enumerate(logs):
        command = [sys.executable, str(TESTS / "distributed_worker.py"), str(rank), str(WORLD), str(out / "store")]
        with log.open("w") as sink:
            processes.append(subprocess.Popen([*command, str(out), backends], env=env, stdout=sink, stderr=sink))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        tails = "\n".join(log.read_text()[-3000:] for log in logs)
        pytest.fail(f"the ranks did not finish in {TIMEOUT_S} s:\n{tails}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for rank, log in enumerate(logs):
        saved = out / f"rank{rank}.pt"
        if not saved.exists():
            pytest.fail(f"rank {rank} saved no results (exit {processes[rank].returncode}):\n{log.read_text()[-3000:]}")
        results.append(torch.load(saved, weights_only=False))
    return results


def _result(ranks: list[dict], rank: int, key: str) -> dict:
    results = ranks[rank]
    if key not in results:
        pytest.fail(f"rank {rank} stopped before {key}: {results['error']}")
    return results[key]


def test_ranks_ran_this_checkout_without_error(ranks):
    for rank, results in enumerate(ranks):
        assert results["error"] is None, f"rank {rank}: {results['error']}"
        assert Path(results["adam_gpu"]).resolve().is_relative_to(REPO), results["adam_gpu"]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("case", CASES)
def test_every_rank_matches_torch_adamw_under_the_same_wrapper(ranks, case, backend):
    for rank in range(WORLD):
        ours, theirs = _result(ranks, rank, f"{case}/{backend}"), _result(ranks, rank, f"{case}/torch.optim")
        where = f"rank {rank}"
        for index, (param, expected, initial) in enumerate(zip(ours["params"], theirs["params"], ours["initial"],
                                                                strict=True)):  # fmt: skip
            assert_close_relative(param, expected, f"{where} param {index}")
            moved = (expected - initial).abs().max() / (FP32_RTOL * expected.abs().max())
            assert moved > MOVED, f"{where}: torch.optim moved param {index} by {moved:.3g} times the tolerance only"
        assert set(ours["selected_backends"]) == {backend}
        beta2 = CASES[case][1].get("betas", (0.9, 0.999))[1]
        _assert_same_state(ours["state"], theirs["state"], beta2, where)
        if "dcp" in theirs:
            _assert_same_state(ours["dcp"], theirs["dcp"], beta2, f"{where} distributed checkpoint")


def _assert_same_state(ours: dict | None, theirs: dict | None, beta2: float, where: str) -> None:
    """Same params with state, same keys, the same class (DTensor or Tensor) and shape, and close values.

    exp_avg is a weighted sum of the grads (weights below 1 in all), so its rounding error is relative to
    the grads, not to itself: where they cancel (a 1-element bias: 3e-3 from grads of 1e-1) a relative
    bound on exp_avg alone fails on plain fp32 rounding. sqrt(exp_avg_sq / (1 - beta2)) bounds the largest
    grad (up to beta2**(-STEPS / 2), about 1), so it is the scale for exp_avg's tolerance."""
    assert (ours is None) == (theirs is None), where
    if theirs is None:  # ZeroRedundancyOptimizer consolidates the state_dict on rank 0 only
        return
    assert ours.keys() == theirs.keys(), f"{where}: state of params {sorted(ours)}, torch: {sorted(theirs)}"
    for index, state in theirs.items():
        assert ours[index].keys() == state.keys(), f"{where} state {index}: keys {sorted(ours[index])}"
        values = {}
        for key, expected in state.items():
            actual = ours[index][key]
            if isinstance(expected, tuple):  # (class name, shape, full value)
                assert actual[:2] == expected[:2], f"{where} state {index} {key}: {actual[:2]}, torch: {expected[:2]}"
                actual, expected = actual[2], expected[2]
            values[key] = actual, expected
        grad_scale = (values["exp_avg_sq"][1] / (1 - beta2)).sqrt()
        for key, (actual, expected) in values.items():
            before = grad_scale if key == "exp_avg" else None
            assert_close_relative(actual, expected, f"{where} state {index} {key}", before=before)


@pytest.mark.parametrize("case", [case for case, (wrapper, _) in CASES.items() if wrapper != "fsdp-first-layer"])
def test_replicated_params_end_identical_on_every_rank(ranks, case):
    """DDP and ZeRO keep a full copy of the params on every rank; FSDP's gathered params must agree too."""
    backends = [name for name, why in _cpu_backends().items() if why is None]
    for backend in backends:
        first, *others = [_result(ranks, rank, f"{case}/{backend}")["params"] for rank in range(WORLD)]
        for rank, params in enumerate(others, start=1):
            for index, (param, expected) in enumerate(zip(params, first, strict=True)):
                assert torch.equal(param, expected), f"{backend}: param {index} differs between rank 0 and {rank}"


def test_fsdp_cases_cover_uneven_and_empty_shards_and_clipping(ranks):
    """What the FSDP cases are meant to exercise did happen: shards of unequal size, an empty one on rank 1,
    and clipping on every step (torch's clip_grad_norm_ saw a norm above max_grad_norm)."""
    shapes = [_result(ranks, rank, "fsdp/torch.optim")["local_shapes"] for rank in range(WORLD)]
    assert shapes[0] != shapes[1]
    assert any(0 in shape for shape in shapes[1]), shapes[1]
    for rank in range(WORLD):
        for case in ("fsdp-clip", "fsdp-mixed-clip"):
            norms = _result(ranks, rank, f"{case}/torch.optim")["norms"]
            assert len(norms) == STEPS and min(norms) > MAX_GRAD_NORM, f"{case}: {norms}"


@pytest.mark.parametrize("backend", _backend_params())
def test_functional_step_on_dtensors_and_clear_errors(ranks, backend):
    """fused_adam given DTensors, and FusedAdamW with master weights for bf16 DTensors, update the local shards
    exactly as the full tensors; FusedAdamW names a grad sharded unlike its param, and refuses 8-bit moments
    for DTensor params."""
    for rank in range(WORLD):
        checks = _result(ranks, rank, f"checks/{backend}")
        for index, (ours, expected) in enumerate(checks["functional"]):
            if backend == "torch" and ours.device.type == "cpu":
                # torch's fused CPU kernel (the torch backend's CPU path) rounds its vector loop and its tail
                # differently: a shard's element can end one rounding away from the full tensor's (README).
                assert_close_relative(ours, expected, f"rank {rank}: tensor {index} of the functional step")
                continue
            assert torch.equal(ours, expected), f"rank {rank}: tensor {index} of the functional step"
        for master_weights in ("True", "lean"):
            plain, sharded = checks[f"master_weights={master_weights}"]
            assert plain.keys() == sharded.keys()
            for key, expected in plain.items():
                assert torch.equal(sharded[key], expected), f"rank {rank} master_weights={master_weights}: {key}"
        assert checks["plain grad"].startswith("TypeError: param 0 is a DTensor but its grad is a plain tensor")
        assert checks["replicated grad"].startswith("ValueError: grad 0 is sharded as (Replicate(),)")
        assert checks["8bit"].startswith("TypeError: state_dtype='8bit' is not supported for DTensor params")
