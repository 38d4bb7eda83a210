"""The benchmark report: Markdown tables, targets and plot are drawn from a run's JSON, numbers as recorded."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from adam_gpu.bench import report
from adam_gpu.bench.records import GRAPH_FAILED, NOT_INSTALLED, TOO_SLOW, UNSUPPORTED, WIDE_SPREAD, Record, Run

COPY_GBPS = 3000.0
BYTES_PER_PARAM = {"fp32": 28.0, "bf16": 14.0, "bf16+fp32-moments": 22.0}  # read p, g, m, v + write p, m, v
STATE_BYTES_PER_PARAM = {"fp32": 8.0, "bf16": 4.0, "bf16+fp32-moments": 8.0}
FAMILIES = {
    "torch for-loop": "torch",
    "torch foreach": "torch",
    "torch fused": "torch",
    "adam-gpu triton": "adam-gpu",
    "adam-gpu cupy": "adam-gpu",
}
# Fraction of the copy bandwidth each contender reaches on a large flat tensor. Chosen so the large-fp32 targets are
# met: triton reaches 95 % (>= 92 %) and 0.95 / 0.90 = 1.056x over torch fused (>= 1.05x).
FLAT_EFFICIENCY = {
    "torch for-loop": 0.30,
    "torch foreach": 0.70,
    "torch fused": 0.90,
    "adam-gpu triton": 0.95,
    "adam-gpu cupy": 0.93,
}
# Milliseconds per step on the list cases, chosen for the targets: on gpt2-124m the best adam-gpu contender (cupy)
# is 1.10x torch fused, short of 1.15x; on 1000x4096 triton is 2.0x fused (>= 1.5x) but 4.0x foreach (< 5x).
LIST_MS = {
    "gpt2-124m": {"torch for-loop": 18.0, "torch foreach": 4.4, "torch fused": 2.2, "adam-gpu triton": 2.1},
    "1000x4096": {"torch for-loop": 20.0, "torch foreach": 0.8, "torch fused": 0.4, "adam-gpu triton": 0.2},
}
LIST_MS["gpt2-124m"]["adam-gpu cupy"] = 2.0
LIST_SHAPES = {"gpt2-124m": (148, 124_439_808), "1000x4096": (1000, 4_096_000)}  # (tensors, numel)
FLAT_LOG2 = (12, 16, 20, 24, 26)
DEVICE = "NVIDIA H100 80GB HBM3"


def _measured(contender: str, case: str, policy: str, numel: int, tensors: int, median_ms: float) -> Record:
    bytes_moved = numel * BYTES_PER_PARAM[policy]
    gbps = bytes_moved / (median_ms * 1e-3) / 1e9
    return Record(
        contender=contender,
        family=FAMILIES[contender],
        case=case,
        policy=policy,
        numel=numel,
        tensors=tensors,
        median_ms=median_ms,
        p20_ms=median_ms * 0.98,
        p80_ms=median_ms * 1.03,
        graph_median_ms=median_ms * 0.9 if tensors > 1 else None,
        host_ms=0.01 * tensors,
        bytes_per_param=BYTES_PER_PARAM[policy],
        state_bytes_per_param=STATE_BYTES_PER_PARAM[policy],
        gbps=gbps,
        pct_copy=100 * gbps / COPY_GBPS,
    )


def _with_speedups(records: list[Record]) -> list[Record]:
    """Fill in the speed-ups the way the runner does: torch's median / this median, same case and policy."""
    medians = {(r.contender, r.case, r.policy): r.median_ms for r in records if r.median_ms is not None}
    for r in records:
        if r.median_ms is None:
            continue
        fused = medians.get(("torch fused", r.case, r.policy))
        foreach = medians.get(("torch foreach", r.case, r.policy))
        r.speedup_vs_torch_fused = None if fused is None else fused / r.median_ms
        r.speedup_vs_torch_foreach = None if foreach is None else foreach / r.median_ms
    return records


def _flat_records() -> list[Record]:
    records = []
    for policy in ("fp32", "bf16"):
        for log2 in FLAT_LOG2:
            numel = 2**log2
            # Small tensors are launch-bound: the reachable bandwidth falls off below about 2^20 elements.
            launch_bound = min(1.0, numel / 2**20) ** 0.5
            for contender, efficiency in FLAT_EFFICIENCY.items():
                gbps = COPY_GBPS * efficiency * launch_bound
                median_ms = numel * BYTES_PER_PARAM[policy] / (gbps * 1e9) * 1e3
                records.append(_measured(contender, f"flat 2^{log2}", policy, numel, 1, median_ms))
        records.append(
            Record(
                "apex FusedAdam",
                "apex",
                f"flat 2^{FLAT_LOG2[-1]}",
                policy,
                2 ** FLAT_LOG2[-1],
                1,
                status=NOT_INSTALLED,
                reason="apex is not importable",
            )
        )
    return records


def _list_records() -> list[Record]:
    records = []
    for case, medians in LIST_MS.items():
        tensors, numel = LIST_SHAPES[case]
        records += [_measured(c, case, "fp32", numel, tensors, ms) for c, ms in medians.items()]
    tensors, numel = LIST_SHAPES["gpt2-124m"]
    # Moments in fp32 next to bf16 params: torch cannot, so there is no torch fused baseline for this policy.
    records.append(
        Record(
            "torch fused",
            "torch",
            "gpt2-124m",
            "bf16+fp32-moments",
            numel,
            tensors,
            status=UNSUPPORTED,
            reason="torch keeps moments in the param dtype",
        )
    )
    records.append(_measured("adam-gpu triton", "gpt2-124m", "bf16+fp32-moments", numel, tensors, 1.8))
    return records


def _environment(device_type: str = "cuda") -> dict:
    return {
        "device": DEVICE if device_type == "cuda" else "AMD EPYC 9654",
        "device_type": device_type,
        "driver": "550.54.15" if device_type == "cuda" else None,
        "torch": "2.5.1",
        "triton": "3.1.0",
        "cupy": None,
        "date": "2026-01-15T10:00:00",
        "python": "3.12.3",
        "quick": False,
    }


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """A synthetic run, read back from the JSON it was written to, as the report reads it."""
    written = Run(_environment(), COPY_GBPS, _with_speedups(_flat_records() + _list_records()))
    path = tmp_path / "synthetic.json"
    written.to_json(path)
    return Run.from_json(path)


def _case_table(markdown: str, case: str) -> list[dict[str, str]]:
    """The rows of one case's table as {column: cell}."""
    lines = markdown.splitlines()
    start = lines.index(f"## {case}") + 2
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    header, _align, *rows = table
    return [dict(zip(header, row, strict=True)) for row in rows]


def _row(markdown: str, case: str, contender: str, policy: str) -> dict[str, str]:
    matches = [r for r in _case_table(markdown, case) if r["contender"] == contender and r["policy"] == policy]
    assert len(matches) == 1, f"{contender} / {policy} appears {len(matches)} times in {case}"
    return matches[0]


def _find(run: Run, contender: str, case: str, policy: str) -> Record:
    return next(r for r in run.records if (r.contender, r.case, r.policy) == (contender, case, policy))


def test_header_names_device_versions_and_copy_bandwidth(run: Run) -> None:
    markdown = report.markdown_table(run)
    assert markdown.startswith(f"# Adam step benchmark: {DEVICE}\n")
    assert "3000 GB/s" in markdown
    assert "2026-01-15T10:00:00" in markdown
    assert "torch 2.5.1, triton 3.1.0, cupy not installed" in markdown
    assert "GPU kernels were not measured" not in markdown


def test_cpu_run_starts_by_saying_gpu_kernels_were_not_measured(run: Run) -> None:
    run.environment = _environment("cpu")
    first_line = report.markdown_table(run).splitlines()[0]
    assert first_line.startswith("**GPU kernels were not measured") and first_line.endswith("**")


def test_every_case_and_contender_appears_in_order(run: Run) -> None:
    markdown = report.markdown_table(run)
    headings = [line[3:] for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == ["Not measured", *(f"flat 2^{n}" for n in FLAT_LOG2), "gpt2-124m", "1000x4096"]
    for case in headings[1:]:
        expected = {(r.contender, r.policy) for r in run.records if r.case == case and r.status == "ok"}
        rows = _case_table(markdown, case)
        assert {(r["contender"], r["policy"]) for r in rows} == expected
        policies = [r["policy"] for r in rows]
        assert policies == sorted(policies, key=policies.index), f"{case}: rows not grouped by policy"


def test_numbers_in_the_table_are_the_records_formatted(run: Run) -> None:
    markdown = report.markdown_table(run)
    record = _find(run, "adam-gpu triton", "flat 2^26", "fp32")
    row = _row(markdown, "flat 2^26", "adam-gpu triton", "fp32")
    assert row["GB/s"] == "2850"
    assert row["% of copy bandwidth"] == "95.0 %"
    assert row["speed-up vs torch fused"] == f"{0.95 / 0.90:.2f}x" == "1.06x"
    assert row["median ms (p20–p80)"] == (
        f"{report.format_ms(record.median_ms)} ({report.format_ms(record.p20_ms)}–{report.format_ms(record.p80_ms)})"
    )
    assert row["CUDA-graph ms"] == "—"
    assert row["numel"] == "67,108,864"
    assert row["state bytes/param"] == "8"
    gpt2 = _row(markdown, "gpt2-124m", "torch foreach", "fp32")
    assert gpt2["median ms (p20–p80)"].startswith("4.40 (")
    assert gpt2["CUDA-graph ms"] == "3.96"
    assert gpt2["host ms"] == "1.48"
    assert gpt2["speed-up vs torch foreach"] == "1.00x"


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0123456, "0.0123"), (1.2, "1.20"), (9.996, "10.0"), (123.4, "123"), (100.0, "100"), (4321.5, "4322")],
)
def test_milliseconds_keep_three_significant_digits(value: float, text: str) -> None:
    assert report.format_ms(value) == text


def test_contenders_that_cannot_run_are_one_line_each_not_rows(run: Run) -> None:
    """Not installed or unsupported: one line per contender and reason under "Not measured", with the pairs it
    concerns where it is not all of them; no rows in the case tables."""
    markdown = report.markdown_table(run)
    section = markdown[markdown.index("## Not measured\n") : markdown.index("\n## flat 2^12")]
    assert "- apex FusedAdam: not installed: apex is not importable; 2 of 13 pairs (policies fp32, bf16)" in section
    fused = "- torch fused: unsupported: torch keeps moments in the param dtype; 1 of 13 pairs (policies bf16+fp32"
    assert fused in section
    assert section.count("\n- ") == 2
    assert not [r for r in _case_table(markdown, "flat 2^26") if r["contender"] == "apex FusedAdam"]
    flat = [dataclasses.replace(r, status=NOT_INSTALLED) for r in run.records if report.flat_log2(r.case)]
    lines = report.unmeasurable_lines(Run(run.environment, COPY_GBPS, flat))
    assert "- adam-gpu triton: not installed; every pair" in lines and len(lines) == len(FAMILIES) + 1


def test_a_measurement_that_failed_or_was_too_slow_keeps_its_row(run: Run) -> None:
    record = _find(run, "torch for-loop", "gpt2-124m", "fp32")
    record.status, record.reason, record.median_ms = TOO_SLOW, "first step 9.00 s: ...", None
    row = _row(report.markdown_table(run), "gpt2-124m", "torch for-loop", "fp32")
    assert row["median ms (p20–p80)"] == "*too slow: first step 9.00 s: ...*" and row["GB/s"] == "—"


def test_a_wide_spread_is_said_and_marks_the_speedups_drawn_from_it(run: Run) -> None:
    fused = _find(run, "torch fused", "gpt2-124m", "fp32")
    fused.p20_ms, fused.p80_ms = fused.median_ms * 0.5, fused.median_ms * (0.5 + WIDE_SPREAD + 0.01)
    assert fused.wide and fused.spread == pytest.approx(WIDE_SPREAD + 0.01)
    markdown = report.markdown_table(run)
    assert _row(markdown, "gpt2-124m", "torch fused", "fp32")["spread"] == f"{100 * fused.spread:.0f} % wide"
    cupy = _row(markdown, "gpt2-124m", "adam-gpu cupy", "fp32")
    assert cupy["spread"] == "5 %", "p20 and p80 of the fixture: 0.98 and 1.03 of the median"
    assert cupy["speed-up vs torch fused"] == "1.10x wide", "drawn from a wide baseline"
    assert cupy["speed-up vs torch foreach"] == "2.20x", "torch foreach's median is steady"
    measured = sum(r.median_ms is not None for r in run.records)
    assert f"**1 of {measured}** above {100 * WIDE_SPREAD:.0f} % are marked *wide*" in markdown


def test_percent_of_copy_is_shown_only_where_the_records_have_it(run: Run) -> None:
    assert "% of copy bandwidth" in report.markdown_table(run) and "CUDA-graph ms" in report.markdown_table(run)
    run.environment = _environment("cpu")
    for record in run.records:
        record.pct_copy = None
    markdown = report.markdown_table(run)
    assert "% of copy bandwidth |" not in markdown and "No % of copy bandwidth on the CPU" in markdown
    assert "CUDA-graph ms" not in markdown
    assert "spread" in _case_table(markdown, "flat 2^26")[0]


def test_gpu_targets_are_not_graded_on_a_cpu_run(run: Run) -> None:
    run.environment = _environment("cpu")
    section = report.targets_markdown(run)
    assert section.startswith("## Targets\n") and "not graded on a CPU run" in section
    assert "| ≥" not in section and "**no**" not in section


def test_a_step_that_could_not_be_captured_keeps_its_eager_numbers(run: Run) -> None:
    record = _find(run, "torch foreach", "gpt2-124m", "fp32")
    record.graph_median_ms, record.reason = None, f"{GRAPH_FAILED}: RuntimeError: no copies while capturing"
    row = _row(report.markdown_table(run), "gpt2-124m", "torch foreach", "fp32")
    assert row["CUDA-graph ms"] == f"*{GRAPH_FAILED}: RuntimeError: no copies while capturing*"
    assert row["median ms (p20–p80)"].startswith("4.40 (") and row["host ms"] == "1.48"


def _target(rows: list[dict], name_start: str, case: str, policy: str) -> dict:
    matches = [r for r in rows if r["target"].startswith(name_start) and r["case"] == case and r["policy"] == policy]
    assert len(matches) == 1, matches
    return matches[0]


def test_targets_from_known_numbers(run: Run) -> None:
    rows = report.targets(run)
    large = "large fp32 flat tensors"
    for case in ("flat 2^24", "flat 2^26"):  # met: 95 % of copy, 1.056x torch fused
        pct = _target(rows, f"{large}: % of copy", case, "fp32")
        assert pct["contender"] == "adam-gpu triton"
        assert pct["value"] == pytest.approx(95.0) and pct["met"]
        assert _target(rows, f"{large}: speed-up", case, "fp32")["met"]
    assert not any(r["case"] in ("flat 2^20", "flat 2^16") for r in rows), "only 2^24 and up are large"
    # Not met: the best adam-gpu contender (cupy, 2.0 ms) is 1.10x torch fused, short of 1.15x.
    gpt2 = _target(rows, "model parameter lists", "gpt2-124m", "fp32")
    assert gpt2["contender"] == "adam-gpu cupy"
    assert gpt2["value"] == pytest.approx(1.1) and not gpt2["met"]
    assert gpt2["target_value"] == 1.15
    # A policy torch has not (fp32 moments of bf16 params): no speed-up target over torch applies.
    assert not [r for r in rows if r["policy"] == "bf16+fp32-moments"], "torch fused cannot run this policy"
    # Never measured: still a row, missing, not met.
    for case in ("llama-3.2-1b", "resnet-50"):
        missing = _target(rows, "model parameter lists", case, report.ANY_POLICY)
        assert missing["value"] is None and not missing["met"] and missing["note"] == "not measured"
    fused = _target(rows, "1000 x 4096 tensors: speed-up vs torch fused", "1000x4096", "fp32")
    assert fused["value"] == pytest.approx(2.0) and fused["met"]
    foreach = _target(rows, "1000 x 4096 tensors: speed-up vs torch foreach", "1000x4096", "fp32")
    assert foreach["value"] == pytest.approx(4.0) and not foreach["met"]


def test_targets_show_the_speedup_as_cuda_graphs_beside_the_eager_one(run: Run) -> None:
    """Where both sides were captured (launch-bound cases), the row also gives the speed-up between replays;
    the eager speed-up alone decides whether the target is met."""
    fused = _find(run, "torch fused", "gpt2-124m", "fp32")
    _find(run, "adam-gpu triton", "gpt2-124m", "fp32").graph_median_ms = fused.graph_median_ms / 1.6
    rows = report.targets(run)
    gpt2 = _target(rows, "model parameter lists", "gpt2-124m", "fp32")
    assert gpt2["graph_value"] == pytest.approx(1.6) and gpt2["value"] == pytest.approx(1.1) and not gpt2["met"]
    foreach = _target(rows, "1000 x 4096 tensors: speed-up vs torch foreach", "1000x4096", "fp32")
    assert foreach["graph_value"] == pytest.approx(foreach["value"]), "the fixture's graphs are 0.9x every median"
    assert all(r["graph_value"] is None for r in rows if r["case"].startswith("flat")), "one tensor: no graph"
    assert "| adam-gpu cupy | 1.10x | ≥ 1.15x | **no** | 1.60x |" in report.targets_markdown(run)


def test_targets_without_large_flat_cases_are_missing(run: Run) -> None:
    run.records = [r for r in run.records if r.case not in ("flat 2^24", "flat 2^26")]
    rows = [r for r in report.targets(run) if r["target"].startswith("large fp32 flat tensors")]
    assert [r["case"] for r in rows] == [report.LARGE_FLAT_PLACEHOLDER] * 2
    assert all(r["value"] is None and not r["met"] for r in rows)


def test_targets_section_renders_every_row(run: Run) -> None:
    section = report.targets_markdown(run)
    assert section.startswith("## Targets\n")
    table_rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert len(table_rows) == len(report.targets(run))
    assert "| model parameter lists: speed-up vs torch fused | gpt2-124m | fp32 | adam-gpu cupy | 1.10x |" in section
    assert "| ≥ 92.0 % | yes |" in section
    assert "*not measured*" in section


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_write_reports_writes_markdown_and_plot(run: Run, tmp_path: Path) -> None:
    paths = report.write_reports(run, tmp_path / "out", stem="h100")
    assert paths == {"markdown": tmp_path / "out" / "h100.md", "plot": tmp_path / "out" / "h100.png"}
    markdown = paths["markdown"].read_text()
    assert markdown.startswith(report.markdown_table(run)) and "## Targets" in markdown
    _assert_png(paths["plot"])


def test_plot_says_where_it_ran_and_draws_the_model_cases(run: Run, tmp_path: Path) -> None:
    figure = report.plot(run, tmp_path / "gpu.png")
    flat_axes, models = figure.axes[:2], figure.axes[2]
    assert [ax.get_title() for ax in flat_axes] == ["flat tensors, policy fp32", "flat tensors, policy bf16"]
    labels = [label.get_text() for label in models.get_xticklabels()]
    assert labels == ["gpt2-124m\nfp32", "1000x4096\nfp32", "gpt2-124m\nbf16+fp32-moments"]
    bars = sum(len(container) for container in models.containers)
    assert bars == sum(r.status == "ok" and report.flat_log2(r.case) is None for r in run.records)
    title = figure.get_suptitle()
    assert DEVICE in title and "CPU" not in title and "adam-gpu cupy" in title
    assert any(line.get_linestyle() == "--" for line in flat_axes[0].get_lines()), "the copy bandwidth ceiling"
    run.environment = _environment("cpu")
    for record in run.records:
        record.pct_copy = None
    figure = report.plot(run, tmp_path / "cpu.png")
    assert "CPU only: the GPU kernels were not measured" in figure.get_suptitle()
    assert not any(line.get_linestyle() == "--" for line in figure.axes[0].get_lines()), "no ceiling on a CPU"
    _assert_png(tmp_path / "cpu.png")


def test_plot_without_flat_cases(run: Run, tmp_path: Path) -> None:
    run.records = [r for r in run.records if report.flat_log2(r.case) is None]
    report.plot(run, tmp_path / "empty.png")
    _assert_png(tmp_path / "empty.png")


def test_main_report_rerenders_from_json(run: Run, tmp_path: Path) -> None:
    json_path = tmp_path / "results.json"
    run.to_json(json_path)
    assert report.main_report(json_path, None) == 0
    assert (tmp_path / "results.md").read_text().startswith(f"# Adam step benchmark: {DEVICE}")
    _assert_png(tmp_path / "results.png")
    assert report.main_report(tmp_path / "missing.json", None) == 1


def test_importing_and_plotting_leave_pyplot_alone(tmp_path: Path) -> None:
    # pyplot would pick an interactive backend (or switch the caller's); the report never needs it.
    code = (
        "import sys; from pathlib import Path;"
        "from adam_gpu.bench import report; from adam_gpu.bench.records import Run;"
        "assert 'matplotlib' not in sys.modules;"
        f"report.plot(Run({{}}, 1000.0), Path({str(tmp_path / 'p.png')!r}));"
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_speedup_whose_baseline_failed_is_missing_not_met(run: Run) -> None:
    """A baseline that could run the policy but whose measurement failed leaves the target missing, not met (and
    not dropped, as a policy the baseline does not have is)."""
    fused = _find(run, "torch fused", "gpt2-124m", "fp32")
    fused.status, fused.median_ms = "error: RuntimeError: out of memory", None
    for record in run.records:
        if record.case == "gpt2-124m" and record.policy == "fp32":
            record.speedup_vs_torch_fused = None
    gpt2 = _target(report.targets(run), "model parameter lists", "gpt2-124m", "fp32")
    assert gpt2["value"] is None and not gpt2["met"] and gpt2["note"]


def _split_run(run: Run, later_pairs: set[tuple[str, str]], copy_gbps: float) -> tuple[Run, Run]:
    """``run`` as a run its time limit stopped before ``later_pairs``, and a rerun of those pairs alone."""
    later = [r for r in run.records if (r.case, r.policy) in later_pairs]
    stopped = Run(
        dict(run.environment),
        run.copy_gbps,
        [r for r in run.records if (r.case, r.policy) not in later_pairs],
        time_limit_s=100.0,
        not_measured=[f"{case}, {policy}" for case, policy in sorted(later_pairs)],
    )
    return stopped, Run(dict(run.environment, date="2026-11-27"), copy_gbps, later)


def test_runs_merge_into_one_pair_by_pair(run: Run, tmp_path: Path) -> None:
    later = {("gpt2-124m", "fp32"), ("1000x4096", "fp32")}
    stopped, rerun = _split_run(run, later, copy_gbps=2900.0)
    # The rerun measured one pair the first run had too: its records replace the first run's.
    again = _find(run, "adam-gpu triton", "flat 2^24", "fp32")
    rerun.records.append(dataclasses.replace(again, median_ms=again.median_ms * 2))
    stopped.elapsed_s, rerun.elapsed_s = 100.0, 20.0
    merged = Run.merged([stopped, rerun])
    assert merged.not_measured == [] and merged.time_limit_s is None and merged.elapsed_s == 120.0
    key = lambda r: (r.case, r.policy, r.contender)  # noqa: E731
    kept = [key(r) for r in run.records if (r.case, r.policy) != ("flat 2^24", "fp32")]
    assert sorted(map(key, merged.records)) == sorted([*kept, key(again)]), "each pair from the last run measuring it"
    flat_24 = [r for r in merged.records if (r.case, r.policy) == ("flat 2^24", "fp32")]
    assert [r.median_ms for r in flat_24] == [again.median_ms * 2]
    assert merged.copy_gbps == COPY_GBPS and merged.environment == run.environment
    assert merged.merged_from == [
        {
            "date": run.environment["date"],
            "copy_gbps": COPY_GBPS,
            "pairs": len({(r.case, r.policy) for r in stopped.records}),
        },
        {"date": "2026-11-27", "copy_gbps": 2900.0, "pairs": 3},
    ]
    header = report.markdown_table(merged)
    assert "merged from 2 runs" in header and "2900 GB/s (3 pairs)" in header and "stopped by" not in header
    # A pair no run measured stays listed.
    assert Run.merged([stopped]).not_measured == stopped.not_measured


def test_report_merges_several_jsons_into_out(run: Run, tmp_path: Path) -> None:
    stopped, rerun = _split_run(run, {("gpt2-124m", "fp32")}, copy_gbps=2900.0)
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for part, path in zip((stopped, rerun), paths, strict=True):
        part.to_json(path)
    assert report.main_report(paths, None) == 1, "several JSONs need --out"
    assert report.main_report(paths, tmp_path / "merged") == 0
    merged = Run.from_json(tmp_path / "merged" / "results.json")
    assert len(merged.records) == len(run.records) and len(merged.merged_from) == 2
    assert "merged from 2 runs" in (tmp_path / "merged" / "results.md").read_text()
    _assert_png(tmp_path / "merged" / "results.png")
    rerun.environment["device"] = "NVIDIA H100"
    rerun.to_json(paths[1])
    assert report.main_report(paths, tmp_path / "other") == 1, "runs on two devices do not merge"
    with pytest.raises(ValueError, match="runs differ in device"):
        Run.merged([stopped, rerun])
