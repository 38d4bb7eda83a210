"""The Markdown table, the targets and the bandwidth plot of a benchmark run, all drawn from its JSON.

Nothing here measures anything: every number printed or plotted is a field of a ``Record`` or of the
``Run`` (``copy_gbps``, ``environment``), so a table can always be re-rendered from the JSON it came from
(``adam-gpu bench --report results.json``). matplotlib is imported only by ``plot``: the table needs
nothing beyond the standard library.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adam_gpu.bench.records import GRAPH_FAILED, NOT_INSTALLED, OK, UNSUPPORTED, WIDE_SPREAD, Record, Run

DASH = "—"
ADAM_GPU_FAMILY = "adam-gpu"
# "flat 2^24" and up: one tensor large enough that the step is bandwidth-bound, not launch-bound.
FLAT_CASE = re.compile(r"flat 2\^(\d+)")
LARGE_FLAT_LOG2 = 24
LARGE_FLAT_PLACEHOLDER = f"flat 2^{LARGE_FLAT_LOG2} or larger"
ANY_POLICY = "any"
PLOT_DPI = 120
WIDE = "wide"  # marks a spread above WIDE_SPREAD, and a speed-up drawn from such a median
# Statuses of contenders that could not run here at all: listed once each, under the tables, not row by row.
UNMEASURABLE = (NOT_INSTALLED, UNSUPPORTED)

COLUMNS = (
    ("contender", ":---"),
    ("policy", ":---"),
    ("tensors", "---:"),
    ("numel", "---:"),
    ("median ms (p20–p80)", "---:"),
    ("spread", "---:"),
    ("CUDA-graph ms", "---:"),
    ("host ms", "---:"),
    ("GB/s", "---:"),
    ("% of copy bandwidth", "---:"),
    ("speed-up vs torch fused", "---:"),
    ("speed-up vs torch foreach", "---:"),
    ("state bytes/param", "---:"),
)


# --- number formatting -------------------------------------------------------------------------------------------


def format_ms(value: float | None) -> str:
    """Milliseconds to 3 significant digits ("0.0123", "1.20", "123"); 1000 ms and more as whole numbers."""
    if value is None:
        return DASH
    if abs(value) >= 1000:
        return f"{value:.0f}"
    # "#" keeps trailing zeros so a column reads evenly ("1.20", not "1.2"); it also leaves "123." behind.
    return f"{value:#.3g}".rstrip(".")


def format_gbps(value: float | None) -> str:
    """GB/s (10^9 bytes per second) as a whole number."""
    return DASH if value is None else f"{value:.0f}"


def format_pct(value: float | None) -> str:
    """A percentage to one decimal, with its sign: "91.7 %"."""
    return DASH if value is None else f"{value:.1f} %"


def format_speedup(value: float | None) -> str:
    """A ratio of medians to two decimals: "1.23x"."""
    return DASH if value is None else f"{value:.2f}x"


def format_spread(record: Record, mark: str = f" {WIDE}") -> str:
    """(p80 - p20) / median as a whole percentage, ``mark`` after it above WIDE_SPREAD: "12 %", "85 % wide"."""
    if record.spread is None:
        return DASH
    return f"{100 * record.spread:.0f} %" + (mark if record.wide else "")


def _baseline(run: Run, record: Record, field: str) -> Record | None:
    name = SPEEDUP_BASELINES[field]
    return next((r for r in run.records if (r.case, r.policy, r.contender) == (record.case, record.policy, name)), None)


def speedup_text(run: Run, record: Record, field: str, mark: str = f" {WIDE}") -> str:
    """A speed-up (``field`` of ``record``), ``mark`` after it where its median or the baseline's is noisy."""
    value = getattr(record, field)
    if value is None:
        return DASH
    baseline = _baseline(run, record, field)
    noisy = record.wide or (baseline is not None and baseline.wide)
    return format_speedup(value) + (mark if noisy else "")


def _format_number(value: float | None) -> str:
    return DASH if value is None else f"{value:g}"


def _cell(text: str) -> str:
    # A reason is free text: a "|" would split the cell and a newline would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def status_text(record: Record) -> str:
    """The status of a record that was not measured, with its reason: "unsupported: torch keeps ..."."""
    if record.reason and record.reason not in record.status:
        return f"{record.status}: {record.reason}"
    return record.status


# --- grouping ------------------------------------------------------------------------------------------------------


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def cases(run: Run) -> list[str]:
    """Case names in order of first appearance."""
    return _unique(r.case for r in run.records)


def _case_rows(run: Run, case: str) -> list[Record]:
    """A case's records grouped by policy (order of first appearance), contenders in record order within each."""
    records = [r for r in run.records if r.case == case]
    policies = _unique(r.policy for r in records)
    return sorted(records, key=lambda r: policies.index(r.policy))  # sorted() is stable: record order survives


def flat_log2(case: str) -> int | None:
    """N for a case named "flat 2^N", else None."""
    match = FLAT_CASE.fullmatch(case)
    return int(match.group(1)) if match else None


# --- the Markdown table --------------------------------------------------------------------------------------------


def environment_lines(run: Run) -> list[str]:
    """The Markdown list items saying where and with what a run measured: date, device, versions, copy bandwidth."""
    env = run.environment
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    threads = f", torch on {env['threads']} thread{'s' if env['threads'] > 1 else ''}" if env.get("threads") else ""
    # None: the runner looked and found no package; a missing key: an older JSON that did not say.
    packages = ("adam_gpu", "torch", "triton", "cupy")
    versions = ", ".join(f"{name} {env.get(name, 'unknown') or 'not installed'}" for name in packages)
    return [
        f"- date: {env.get('date', 'unknown')}",
        f"- device: {env.get('device', 'unknown device')} ({env.get('device_type', 'unknown')}{driver}{threads})",
        f"- versions: {versions}, python {env.get('python', 'unknown')}",
        _bandwidth_line(run),
    ]


def _bandwidth_line(run: Run) -> str:
    if len(run.merged_from) < 2:
        return f"- copy bandwidth measured in this run: **{format_gbps(run.copy_gbps)} GB/s** (read + write counted)"
    parts = ", ".join(
        f"{part['date']}: {format_gbps(part['copy_gbps'])} GB/s ({part['pairs']} pairs)" for part in run.merged_from
    )
    return (
        f"- merged from {len(run.merged_from)} runs on this device, each (case, policy) pair from one run; copy "
        f"bandwidth measured in each (read + write counted), each row's % of it from its own run: {parts}"
    )


def _noise_line(run: Run) -> str:
    measured = [r for r in run.records if r.spread is not None]
    if not measured:
        return "- noise: nothing measured"
    spreads = sorted(r.spread for r in measured)
    wide, middle = sum(r.wide for r in measured), spreads[len(spreads) // 2]
    return (
        f"- noise: spread (p80 - p20) / median of each measurement's samples, median {100 * middle:.0f} "
        f"%, largest {100 * spreads[-1]:.0f} %; **{wide} of {len(measured)}** above {100 * WIDE_SPREAD:.0f} % "
        f"are marked *{WIDE}*, and so is every speed-up drawn from such a median"
    )


def _header(run: Run) -> list[str]:
    env = run.environment
    device = env.get("device", "unknown device")
    device_type = env.get("device_type", "unknown")
    lines = []
    if device_type == "cpu":
        lines += [
            "**GPU kernels were not measured: this run had no CUDA device, so only adam-gpu's torch backend was "
            "timed against torch.optim's CPU implementations.**",
            "",
        ]
    timer = "device time (CUDA events)" if device_type == "cuda" else "wall time"
    lines += [f"# Adam step benchmark: {device}", "", *environment_lines(run), _noise_line(run)]
    if env.get("quick"):
        lines.append("- quick run: fewer cases and repetitions than a full run")
    elif env.get("plan") == "default" and device_type == "cpu":
        lines.append("- the CPU's default plan: a few cases in about 3 minutes (`adam-gpu bench --full`: every case)")
    if run.case_time_limit_s is not None:
        lines.append(
            f"- case time limit {run.case_time_limit_s:.0f} s: a contender whose first step said its measurement "
            "would take longer is listed *too slow*"
        )
    if run.not_measured:
        lines.append(
            f"- **stopped by its time limit ({run.time_limit_s:.0f} s): {len(run.not_measured)} (case, policy) "
            f"pairs not measured**: {'; '.join(run.not_measured)}"
        )
    graph = "CUDA-graph ms is the median of a captured step replayed; " if device_type == "cuda" else ""
    copy = (
        "% of copy bandwidth divides it by the copy bandwidth above, where the step's input sets overflow the L2 "
        "cache as the copy does; "
        if _has_pct(run)
        else ""
    )
    lines += [
        "",
        f"Times are milliseconds per `step()`: the median of {timer}, 20th–80th percentile in parentheses; "
        f"{graph}host ms is CPU time spent inside `step()`. GB/s counts the bytes one step must read and write; "
        f"{copy}speed-ups are the torch optimizer's median over this median, same case and policy.",
    ]
    if device_type == "cpu":
        lines += [
            "",
            "No % of copy bandwidth on the CPU: its caches hold the small cases whole, and a step there is bound "
            'by arithmetic, not by the memory the copy measures (benchmarks/README.md, "Running on a CPU").',
        ]
    return lines


def _has_pct(run: Run) -> bool:
    return any(r.pct_copy is not None for r in run.records)


def _has_graphs(run: Run) -> bool:
    return run.environment.get("device_type") != "cpu"


def _columns(run: Run) -> list[tuple[str, str]]:
    """COLUMNS less those this run has nothing in: % of copy bandwidth, CUDA-graph ms on a CPU run."""
    dropped = set()
    if not _has_pct(run):
        dropped.add("% of copy bandwidth")
    if not _has_graphs(run):
        dropped.add("CUDA-graph ms")
    return [column for column in COLUMNS if column[0] not in dropped]


def _row(run: Run, record: Record) -> dict[str, str]:
    head = {
        "contender": record.contender,
        "policy": record.policy,
        "tensors": str(record.tensors),
        "numel": f"{record.numel:,}",
    }
    if record.status != OK:
        return head | {"median ms (p20–p80)": f"*{status_text(record)}*"}
    median = format_ms(record.median_ms)
    if record.p20_ms is not None and record.p80_ms is not None:
        median += f" ({format_ms(record.p20_ms)}–{format_ms(record.p80_ms)})"
    graph = f"*{record.reason}*" if record.reason.startswith(GRAPH_FAILED) else format_ms(record.graph_median_ms)
    return head | {
        "median ms (p20–p80)": median,
        "spread": format_spread(record),
        "CUDA-graph ms": graph,
        "host ms": format_ms(record.host_ms),
        "GB/s": format_gbps(record.gbps),
        "% of copy bandwidth": format_pct(record.pct_copy),
        "speed-up vs torch fused": speedup_text(run, record, "speedup_vs_torch_fused"),
        "speed-up vs torch foreach": speedup_text(run, record, "speedup_vs_torch_foreach"),
        "state bytes/param": _format_number(record.state_bytes_per_param),
    }


def table_lines(rows: list[list[str]], columns: Iterable[tuple[str, str]]) -> list[str]:
    """A Markdown table: the header, the alignment row of ``columns`` (name, alignment), one line per row."""
    names, aligns = zip(*columns, strict=True)
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(aligns) + "|"]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def unmeasurable_lines(run: Run) -> list[str]:
    """One line per contender and reason it could not run (not installed, unsupported), with the pairs it
    concerns where not all: these records get no table rows."""
    pairs = _unique(f"{r.case}, {r.policy}" for r in run.records)
    grouped: dict[tuple[str, str], list[Record]] = {}
    for record in run.records:
        if record.status in UNMEASURABLE:
            grouped.setdefault((record.contender, status_text(record)), []).append(record)
    lines = []
    for (contender, why), records in grouped.items():
        if len(records) == len(pairs):
            where = "every pair"
        else:
            policies = ", ".join(_unique(r.policy for r in records))
            where = f"{len(records)} of {len(pairs)} pairs (policies {policies})"
        lines.append(f"- {contender}: {why}; {where}")
    return lines


def markdown_table(run: Run) -> str:
    """The run as Markdown: device, date, versions, copy bandwidth and noise, the contenders that could not run
    (one line each), then one table per case.

    On a CPU run (``environment["device_type"] == "cpu"``) the text starts with a bold line saying that no
    GPU kernel was measured. Records that were measured but failed or were too slow show their status and
    reason instead of numbers.
    """
    lines = _header(run)
    unmeasurable = unmeasurable_lines(run)
    if unmeasurable:
        lines += ["", "## Not measured", "", *unmeasurable]
    columns = _columns(run)
    for case in cases(run):
        rows = [_row(run, r) for r in _case_rows(run, case) if r.status not in UNMEASURABLE]
        lines += ["", f"## {case}", ""]
        if not rows:
            lines.append("*no contender could run this case: see Not measured*")
            continue
        lines += table_lines([[row.get(name, DASH) for name, _ in columns] for row in rows], columns)
    return "\n".join(lines) + "\n"


# --- targets -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One target of the issue: ``field`` of the best adam-gpu record must reach ``minimum``."""

    name: str
    field: str  # a Record attribute
    minimum: float
    unit: str  # "%" or "x"
    named_cases: tuple[str, ...] = ()  # empty: every flat case of 2^LARGE_FLAT_LOG2 elements or more
    policy: str | None = None  # None: every policy the case was measured under that the baseline implements


MODEL_CASES = ("gpt2-124m", "llama-3.2-1b", "resnet-50")
TARGETS = (
    Target("large fp32 flat tensors: % of copy bandwidth", "pct_copy", 92.0, "%", policy="fp32"),
    Target("large fp32 flat tensors: speed-up vs torch fused", "speedup_vs_torch_fused", 1.05, "x", policy="fp32"),
    Target("model parameter lists: speed-up vs torch fused", "speedup_vs_torch_fused", 1.15, "x", MODEL_CASES),
    Target("1000 x 4096 tensors: speed-up vs torch fused", "speedup_vs_torch_fused", 1.5, "x", ("1000x4096",)),
    Target("1000 x 4096 tensors: speed-up vs torch foreach", "speedup_vs_torch_foreach", 5.0, "x", ("1000x4096",)),
)


def best_adam_gpu(run: Run, case: str, policy: str) -> Record | None:
    """The adam-gpu record with the lowest median for this case and policy, or None if none was measured.

    Within one case and policy every contender moves the same bytes, so the lowest median is also the highest
    GB/s and the highest speed-up.
    """
    measured = [
        r
        for r in run.records
        if r.case == case
        and r.policy == policy
        and r.family == ADAM_GPU_FAMILY
        and r.status == OK
        and r.median_ms is not None
    ]
    return min(measured, key=lambda r: r.median_ms, default=None)


def _target_cases(target: Target, run: Run) -> list[str]:
    if target.named_cases:
        return list(target.named_cases)
    large = [c for c in cases(run) if (n := flat_log2(c)) is not None and n >= LARGE_FLAT_LOG2]
    return large or [LARGE_FLAT_PLACEHOLDER]


def _target_policies(target: Target, run: Run, case: str) -> list[str]:
    if target.policy is not None:
        return [target.policy]
    measured = _unique(r.policy for r in run.records if r.case == case)
    # A speed-up over a torch optimizer only where torch has the policy (it keeps moments in the param dtype).
    baseline = SPEEDUP_BASELINES.get(target.field)
    lacking = {r.policy for r in run.records if r.case == case and r.contender == baseline and r.status == UNSUPPORTED}
    return [policy for policy in measured if policy not in lacking] or [ANY_POLICY]


# The baseline of each speed-up field, by contender name.
SPEEDUP_BASELINES = {"speedup_vs_torch_fused": "torch fused", "speedup_vs_torch_foreach": "torch foreach"}


def graph_speedup(run: Run, case: str, policy: str, field: str) -> float | None:
    """The same speed-up with both sides captured as CUDA graphs: the baseline's replay median over the best
    adam-gpu replay median (launch-bound cases only, where eager time is mostly the host's); None where either
    side has none."""
    ok = [r for r in run.records if r.case == case and r.policy == policy and r.status == OK and r.graph_median_ms]
    baseline = next((r for r in ok if r.contender == SPEEDUP_BASELINES.get(field)), None)
    ours = min((r.graph_median_ms for r in ok if r.family == ADAM_GPU_FAMILY), default=None)
    return None if baseline is None or ours is None else baseline.graph_median_ms / ours


def _target_row(target: Target, run: Run, case: str, policy: str) -> dict[str, Any]:
    best = best_adam_gpu(run, case, policy)
    value = None if best is None else getattr(best, target.field)
    if not any(r.case == case and r.policy == policy for r in run.records):
        note = "not measured"
    elif best is None:
        note = "no adam-gpu contender measured"
    elif value is None:
        note = f"{best.contender} has no {target.field}"
    else:
        note = ""
    return {
        "target": target.name,
        "case": case,
        "policy": policy,
        "contender": None if best is None else best.contender,
        "value": value,
        "target_value": target.minimum,
        "unit": target.unit,
        "met": value is not None and value >= target.minimum,
        "note": note,
        "graph_value": graph_speedup(run, case, policy, target.field) if target.unit == "x" else None,
    }


def targets(run: Run) -> list[dict[str, Any]]:
    """The issue's targets checked against the best adam-gpu contender of each case and policy.

    Each row: ``target`` (name), ``case``, ``policy``, ``contender`` (the best adam-gpu one, or None),
    ``value`` (the measured % or speed-up, or None when missing), ``target_value``, ``unit`` ("%" or "x"),
    ``met`` (False when missing), ``note`` (why the value is missing, else "") and ``graph_value`` (a speed-up
    as CUDA graphs, beside the target: see graph_speedup). A target whose case was not measured at all still
    gets a row, so a missing measurement cannot pass for a met target.
    """
    return [
        _target_row(target, run, case, policy)
        for target in TARGETS
        for case in _target_cases(target, run)
        for policy in _target_policies(target, run, case)
    ]


def _format_target_value(value: float | None, unit: str) -> str:
    return format_pct(value) if unit == "%" else format_speedup(value)


def targets_markdown(run: Run) -> str:
    """The "Targets" section: one row per target, case and policy, from ``targets(run)``; on a CPU run, a line
    saying they are not graded (they are about the GPU kernels)."""
    rows = [
        [
            row["target"],
            row["case"],
            row["policy"],
            row["contender"] or DASH,
            _format_target_value(row["value"], row["unit"]) if row["value"] is not None else f"*{row['note']}*",
            "≥ " + _format_target_value(row["target_value"], row["unit"]),
            "yes" if row["met"] else "**no**",
            format_speedup(row["graph_value"]),
        ]
        for row in targets(run)
    ]
    columns = [(name, ":---") for name in ("target", "case", "policy", "best adam-gpu contender")]
    columns += [("measured", "---:"), ("target", "---:"), ("met", ":---:"), ("as CUDA graphs", "---:")]
    if run.environment.get("device_type") == "cpu":
        return "## Targets\n\nThe targets are the GPU kernels': not graded on a CPU run.\n"
    lines = [
        "## Targets",
        "",
        "Best adam-gpu contender (lowest median) of each case and policy. The targets are eager steps; as CUDA "
        "graphs: the same speed-up between the replay medians, where both sides were captured.",
        "",
    ]
    return "\n".join(lines + table_lines(rows, columns)) + "\n"


# --- the plot ------------------------------------------------------------------------------------------------------


def _flat_records(run: Run) -> list[Record]:
    return [r for r in run.records if flat_log2(r.case) is not None]


def _power_of_two(value: float, _position: int) -> str:
    return f"$2^{{{round(math.log2(value))}}}$" if value > 0 else ""


def _title(run: Run, contenders: list[str]) -> str:
    env = run.environment
    where = env.get("device", "unknown device")
    if env.get("device_type") == "cpu":
        where += " (CPU only: the GPU kernels were not measured)"
    ran = ", ".join(contenders) or "nothing"
    return f"Adam step bandwidth on {where}, {env.get('date', 'unknown date')}\nmeasured: {ran}"


def _plot_flat(ax: Any, run: Run, policy: str | None, measured: list[Record], colours: dict[str, str]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    families = {r.contender: r.family for r in measured}
    for contender, colour in colours.items():
        points = sorted((r.numel, r.gbps) for r in measured if r.policy == policy and r.contender == contender)
        if points:
            ours = families[contender] == ADAM_GPU_FAMILY
            ax.plot(
                *zip(*points, strict=True),
                marker="o" if ours else "s",
                linestyle="-" if ours else ":",
                color=colour,
                label=contender,
            )
    if _has_pct(run):  # the copy bandwidth is a ceiling only where the report divides by it
        ceiling = f"copy bandwidth {format_gbps(run.copy_gbps)} GB/s"
        ax.axhline(run.copy_gbps, color="black", linestyle="--", label=ceiling)
        ax.text(0.01, run.copy_gbps, ceiling, transform=ax.get_yaxis_transform(), va="bottom", fontsize="small")
    if policy is None:
        ax.text(0.5, 0.5, "no flat-tensor cases measured", transform=ax.transAxes, ha="center", va="center")
        ax.set_xticks([])
    else:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(LogLocator(base=2, numticks=32))
        ax.xaxis.set_major_formatter(FuncFormatter(_power_of_two))
        ax.set_title(f"flat tensors, policy {policy}")
    ax.set_xlabel("elements in one flat tensor")
    ax.set_ylabel("GB/s (read + write)")
    ax.grid(True, alpha=0.3)


def _plot_models(ax: Any, records: list[Record], colours: dict[str, str]) -> None:
    """Grouped bars: GB/s of each contender on each (model case, policy)."""
    groups = _unique(f"{r.case}\n{r.policy}" for r in records)
    present = [c for c in colours if any(r.contender == c for r in records)]
    width = 0.8 / max(len(present), 1)
    for index, contender in enumerate(present):
        gbps = {f"{r.case}\n{r.policy}": r.gbps for r in records if r.contender == contender}
        positions = [g + (index - (len(present) - 1) / 2) * width for g, name in enumerate(groups) if name in gbps]
        heights = [gbps[name] for name in groups if name in gbps]
        ax.bar(positions, heights, width, color=colours[contender], label=contender)
    ax.set_xticks(range(len(groups)), groups, fontsize="small", rotation=30, ha="right", rotation_mode="anchor")
    ax.set_title("model parameter lists and many small tensors")
    ax.set_ylabel("GB/s (read + write)")
    ax.grid(True, axis="y", alpha=0.3)


def plot(run: Run, path: Path) -> Any:
    """GB/s of every measured contender: against numel for the flat-tensor cases (one subplot per policy), and
    as bars for the other cases (model lists, many small tensors) in a row below. The title names the device,
    says when it was a CPU (no GPU kernel measured) and lists who was measured; the copy bandwidth measured in
    the same run is drawn as a dashed ceiling where the records have a % of it (GPU runs). Saved as PNG at
    ``PLOT_DPI``, and returned (a matplotlib Figure). Without flat-tensor cases the figure still gets drawn, with
    a note saying so.
    """
    # The Figure API without pyplot renders with Agg on any machine and leaves pyplot's global backend (and any
    # figures open in the caller's interactive session) alone; importing report.py imports no matplotlib at all.
    from matplotlib.figure import Figure

    measured = [r for r in run.records if r.status == OK and r.gbps is not None]
    flat = [r for r in measured if flat_log2(r.case) is not None]
    others = [r for r in measured if flat_log2(r.case) is None]
    policies = _unique(r.policy for r in _flat_records(run)) or [None]
    # A contender keeps its colour in every subplot, so one legend serves all.
    colours = {c: f"C{i % 10}" for i, c in enumerate(_unique(r.contender for r in measured))}
    rows = 2 if others else 1
    fig = Figure(figsize=(max(6.4 * len(policies), 1.2 * len(_unique(r.case + r.policy for r in others))), 5.2 * rows))
    fig.set_layout_engine("constrained")
    grid = fig.add_gridspec(rows, len(policies))
    axes = [fig.add_subplot(grid[0, column]) for column in range(len(policies))]
    # Small tensors can sit in cache and beat the DRAM copy bandwidth: keep every point (and any ceiling) in view.
    top = max([run.copy_gbps if _has_pct(run) else 0.0, *(r.gbps for r in flat)]) * 1.1 or 1.0
    for ax, policy in zip(axes, policies, strict=True):
        _plot_flat(ax, run, policy, flat, colours)
        ax.set_ylim(0, top)
    if others:
        axes.append(fig.add_subplot(grid[1, :]))
        _plot_models(axes[-1], others, colours)
    # One legend under all subplots: inside an axes it covers the lines of whichever contender plateaus there.
    labelled = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        labelled.update(zip(labels, handles, strict=True))
    if labelled:
        fig.legend(labelled.values(), labelled.keys(), loc="outside lower center", ncols=min(len(labelled), 4))
    fig.suptitle(_title(run, list(colours)))
    fig.savefig(path, dpi=PLOT_DPI, format="png")
    return fig


# --- files ---------------------------------------------------------------------------------------------------------


def write_reports(run: Run, directory: Path, stem: str = "results") -> dict[str, Path]:
    """Write ``<stem>.md`` (tables and targets) and ``<stem>.png`` (plot) into ``directory``; return their paths.

    The JSON itself is written by the runner (``Run.to_json``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": directory / f"{stem}.md", "plot": directory / f"{stem}.png"}
    paths["markdown"].write_text(markdown_table(run) + "\n" + targets_markdown(run))
    plot(run, paths["plot"])
    return paths


def main_report(json_paths: Path | Sequence[Path], directory: Path | None = None) -> int:
    """Re-render the Markdown and the plot of an existing run's JSON; exit status 0, or 1 if it cannot be read.

    The files go beside the JSON unless ``directory`` is given, named after it (results.json -> results.md,
    results.png). Several JSONs of one device (a run its time limit stopped, and reruns of the pairs it left)
    are merged (``Run.merged``) into ``directory``, which they need, as results.json, .md and .png.
    """
    json_paths = [json_paths] if isinstance(json_paths, Path) else list(json_paths)
    if len(json_paths) > 1 and directory is None:
        print("adam-gpu bench --report: several JSONs are merged into --out DIR: name it", file=sys.stderr)
        return 1
    runs = []
    for json_path in json_paths:
        try:
            runs.append(Run.from_json(json_path))
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"adam-gpu bench --report: cannot read {json_path}: {error}", file=sys.stderr)
            return 1
    if len(runs) == 1:
        run, json_path = runs[0], json_paths[0]
    else:
        try:
            run = Run.merged(runs)
        except ValueError as error:
            print(f"adam-gpu bench --report: cannot merge {', '.join(map(str, json_paths))}: {error}", file=sys.stderr)
            return 1
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / "results.json"
        run.to_json(json_path)
    paths = write_reports(run, json_path.parent if directory is None else directory, stem=json_path.stem)
    for path in paths.values():
        print(f"wrote {path}")
    return 0
