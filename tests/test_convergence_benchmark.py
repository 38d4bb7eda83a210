"""benchmarks/convergence.py --quick: it writes the JSON, the Markdown and both plots; the table is drawn
from the JSON (redrawn from the file it is the same, and its best rates and losses are the JSON's); every
task, optimizer, learning rate and seed ran; and the best-tuned runs lowered the loss."""

from __future__ import annotations

import json
import statistics

import pytest
from support import import_script

pytest.importorskip("sklearn.datasets")
pytest.importorskip("matplotlib")
convergence = import_script("benchmarks/convergence.py")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory):
    """The folder a quick run wrote (about 5 s)."""
    folder = tmp_path_factory.mktemp("convergence")
    convergence.main(["--quick", "--out", str(folder)])
    return folder


def _document(out) -> dict:
    return json.loads((out / f"{convergence.STEM}.json").read_text())


def test_every_task_optimizer_rate_and_seed_ran(out):
    document = _document(out)
    quick = convergence.QUICK
    ran = {(r["task"], r["optimizer"], r["lr"], r["seed"]) for r in document["runs"]}
    expected = {
        (task, optimizer, lr, seed)
        for task in convergence.TASKS
        for optimizer in convergence.OPTIMIZERS
        for lr in quick["lrs"]
        for seed in quick["seeds"]
    }
    assert ran == expected and len(document["runs"]) == len(expected)
    evaluations = quick["steps"] // convergence.EVAL_EVERY + 1
    for record in document["runs"]:
        assert record["diverged"] or len(record["losses"]) == evaluations, record
    assert document["meta"]["adam_gpu_backend"] == ["torch"], "FusedAdam(backend='auto') runs torch on the CPU"


def test_best_tuned_runs_lower_the_loss(out):
    summary = convergence.summarize(_document(out))
    for task, entry in summary.items():
        for optimizer, row in entry["rows"].items():
            for curve in row["curves"]:
                assert curve[-1] < curve[0], f"{task}, {optimizer}: {curve[0]} -> {curve[-1]}"
        adam = entry["rows"][convergence.ADAM]["final"][0]
        assert adam < 0.5 * entry["rows"][convergence.ADAM]["curves"][0][0], f"{task}: Adam ended at {adam}"


def test_table_and_plots_come_from_the_json(out):
    document = _document(out)
    text = (out / f"{convergence.STEM}.md").read_text()
    assert text == convergence.markdown(document), "the Markdown is not what the JSON on disk gives"
    for name in (f"{convergence.STEM}.png", "lr_sweep.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE), name
        assert f"]({name})" in text
    # The best rate of each row, found here straight from the runs: lowest mean loss over the curve.
    for task in convergence.TASKS:
        for optimizer in convergence.OPTIMIZERS:
            runs = [r for r in document["runs"] if r["task"] == task and r["optimizer"] == optimizer]
            best = min(runs, key=lambda r: statistics.fmean(r["losses"]) if not r["diverged"] else float("inf"))
            row = next(line for line in text.splitlines() if line.startswith(f"| {task} | {optimizer} |"))
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            assert cells[2].split()[0] == f"{best['lr']:g}", row
            assert float(cells[-1]) == pytest.approx(best["losses"][-1], rel=5e-3), row


def test_report_redraws_the_same_table(out, tmp_path):
    (tmp_path / f"{convergence.STEM}.json").write_text((out / f"{convergence.STEM}.json").read_text())
    convergence.main(["--report", str(tmp_path / f"{convergence.STEM}.json")])
    assert (tmp_path / f"{convergence.STEM}.md").read_text() == (out / f"{convergence.STEM}.md").read_text()
    assert (tmp_path / "lr_sweep.png").exists()
