"""The Markdown report of a launch-configuration sweep (``adam-gpu tune``), drawn from its JSON only.

Per backend: the configuration that is best overall, with the constants to copy it into; the best
configuration of each case beside the default's time; and every configuration ranked. A configuration's score
is the geometric mean over the cases of (the case's best time / its time): 1.0 is best everywhere, and it
ranks only configurations measured on every case the backend ran.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from adam_gpu.bench import report
from adam_gpu.bench.records import OK
from adam_gpu.bench.tune import TuneRecord, TuneRun

STEM = "tune"
# Where each field of a backend's LaunchConfig has its default: the winners are copied there.
CONSTANTS: dict[str, dict[str, tuple[str, str]]] = {
    "triton": {
        "chunk": ("kernels/adam_triton.py", "CHUNK"),
        "block": ("kernels/adam_triton.py", "BLOCK"),
        "num_warps": ("adam_gpu/backends/triton.py", "NUM_WARPS"),
    },
    "cupy": {
        "chunk": ("adam_gpu/backends/cupy.py", "CHUNK"),
        "threads_per_block": ("adam_gpu/backends/cupy.py", "THREADS_PER_BLOCK"),
        "blocks_per_sm": ("adam_gpu/backends/cupy.py", "BLOCKS_PER_SM"),
    },
}

# What a backend's defaults hold beyond the swept fields: said under its winner.
DEFAULTS_NOT_SWEPT: dict[str, str] = {
    "triton": "Every configuration is measured on every launch alike, but by default launches of 8-bit moments "
    "take their own block and warps over the shared chunk (`kernels/adam_triton.py`: QUANTIZED_BLOCK; "
    "`adam_gpu/backends/triton.py`: QUANTIZED_NUM_WARPS): read the 8-bit column per configuration for those.",
    "cupy": "Every configuration is measured on every launch alike, but by default launches of 8-bit moments take "
    "their own threads per block over the shared chunk (`adam_gpu/backends/cupy.py`: QUANTIZED_THREADS_PER_BLOCK): "
    "read the 8-bit column per configuration for those.",
}

Pair = tuple[str, str]  # (case, policy)
ConfigKey = tuple[tuple[str, int], ...]


def config_key(config: dict[str, int]) -> ConfigKey:
    return tuple(config.items())


def format_config(config: dict[str, int] | ConfigKey) -> str:
    items = config.items() if isinstance(config, dict) else config
    return " ".join(f"{name}={value}" for name, value in items)


@dataclass(frozen=True)
class Ranked:
    """One configuration of one backend: its times per pair, and (when it has every pair) its score and worst
    ratio (the lowest case-best / its time)."""

    config: ConfigKey
    default: bool
    records: dict[Pair, TuneRecord]
    score: float | None
    worst: float | None


def _measured(run: TuneRun, backend: str) -> list[TuneRecord]:
    return [r for r in run.records if r.backend == backend and r.status == OK and r.ranked_ms is not None]


def pairs(run: TuneRun, backend: str) -> list[Pair]:
    """The (case, policy) pairs the backend measured, in order of first appearance."""
    return list(dict.fromkeys((r.case, r.policy) for r in _measured(run, backend)))


def best_per_pair(run: TuneRun, backend: str) -> dict[Pair, TuneRecord]:
    best: dict[Pair, TuneRecord] = {}
    for record in _measured(run, backend):
        pair = (record.case, record.policy)
        if pair not in best or record.ranked_ms < best[pair].ranked_ms:
            best[pair] = record
    return best


def ranking(run: TuneRun, backend: str) -> list[Ranked]:
    """Every configuration the backend measured: complete ones by score (best first), then incomplete ones."""
    best = best_per_pair(run, backend)
    by_config: dict[ConfigKey, dict[Pair, TuneRecord]] = {}
    defaults = set()
    for record in _measured(run, backend):
        key = config_key(record.config)
        by_config.setdefault(key, {})[(record.case, record.policy)] = record
        if record.default_config:
            defaults.add(key)
    ranked = []
    for key, records in by_config.items():
        ratios = [best[pair].ranked_ms / records[pair].ranked_ms for pair in best if pair in records]
        complete = len(ratios) == len(best)
        score = math.exp(sum(map(math.log, ratios)) / len(ratios)) if complete else None
        ranked.append(Ranked(key, key in defaults, records, score, min(ratios) if complete else None))
    return sorted(ranked, key=lambda r: (r.score is None, -(r.score or 0.0)))


def _ratio(value: float | None) -> str:
    return report.DASH if value is None else f"{value:.3f}"


def _ms(record: TuneRecord | None) -> str:
    return report.DASH if record is None else report.format_ms(record.ranked_ms)


def _header(run: TuneRun) -> list[str]:
    env = run.environment
    device, device_type = env.get("device", "unknown device"), env.get("device_type", "unknown")
    lines = []
    if device_type != "cuda":
        lines += ["**Not a GPU measurement: Triton ran under its CPU interpreter. Copy nothing from here.**", ""]
    limit = "none" if run.time_limit_s is None else f"{run.time_limit_s:.0f} s"
    took = "unknown (stopped before the end)" if run.elapsed_s is None else f"{run.elapsed_s:.0f} s"
    estimate = report.DASH if run.estimate_s is None else f"{run.estimate_s:.0f} s"
    lines += [
        f"# Launch-configuration sweep: {device}",
        "",
        *report.environment_lines(run),
        f"- time limit {limit}; took {took} (estimated {estimate} on an H100)",
    ]
    if env.get("quick"):
        lines.append("- quick run: tiny cases and two configurations per backend, a check of the pipeline")
    lines += [
        "",
        "Times are milliseconds per `step()` of FusedAdamW: the median of the CUDA-graph replays for launch-bound "
        "cases (several tensors or few elements), else of eager steps (device time, do_bench; wall time on the "
        "CPU). A configuration's score is the geometric mean over the cases of the case's best time divided by "
        "its time (1.000: the best everywhere); worst is the lowest of those ratios.",
    ]
    return lines


def _copy_into(backend: str, config: ConfigKey) -> str:
    places: dict[str, list[str]] = {}
    for name, value in config:
        path, constant = CONSTANTS.get(backend, {}).get(name, ("?", name))
        places.setdefault(path, []).append(f"{constant} = {value}")
    return "; ".join(f"`{path}`: {', '.join(assignments)}" for path, assignments in places.items())


def _best_overall(run: TuneRun, backend: str, ranked: list[Ranked]) -> list[str]:
    complete = [r for r in ranked if r.score is not None]
    if not complete:
        return ["*No configuration was measured on every case.*"]
    winner = complete[0]
    default = next((r for r in ranked if r.default), None)
    measured = len(ranked)
    planned = len(run.plan.get(backend, []))
    env = run.environment
    lines = [
        f"**Best overall: {format_config(winner.config)}** (score {_ratio(winner.score)}, worst {_ratio(winner.worst)})"
        + ("" if default is None else f"; the default {format_config(default.config)} scores {_ratio(default.score)}."),
        "",
        f"Copy into {_copy_into(backend, winner.config)}, with the comment: "
        f"`best of {measured} launch configurations (adam-gpu tune, {env.get('device')}, {env.get('date')})`.",
    ]
    if backend in DEFAULTS_NOT_SWEPT:
        lines += ["", DEFAULTS_NOT_SWEPT[backend]]
    if measured < planned:
        lines += ["", f"Only {measured} of the {planned} planned configurations were measured."]
    return lines


def _per_case(run: TuneRun, backend: str, ranked: list[Ranked]) -> list[str]:
    default = next((r for r in ranked if r.default), None)
    rows = []
    for pair, best in best_per_pair(run, backend).items():
        at_default = None if default is None else default.records.get(pair)
        speedup = None if at_default is None else at_default.ranked_ms / best.ranked_ms
        spread = (
            f" ({report.format_ms(best.p20_ms)}–{report.format_ms(best.p80_ms)})"
            if best.graph_median_ms is None
            else ""
        )
        rows.append(
            [
                *pair,
                format_config(best.config),
                _ms(best) + spread,
                report.format_gbps(best.gbps),
                report.format_pct(best.pct_copy),
                _ms(at_default),
                report.format_speedup(speedup),
            ]
        )
    columns = [("case", ":---"), ("policy", ":---"), ("best configuration", ":---"), ("ms", "---:")]
    columns += [("GB/s", "---:"), ("% of copy", "---:"), ("default ms", "---:"), ("speed-up over default", "---:")]
    return report.table_lines(rows, columns)


def _all_configs(run: TuneRun, backend: str, ranked: list[Ranked]) -> list[str]:
    measured_pairs = pairs(run, backend)
    rows = []
    for position, r in enumerate(ranked, 1):
        name = format_config(r.config) + (" (default)" if r.default else "")
        rank = str(position) if r.score is not None else "incomplete"
        rows.append([rank, name, _ratio(r.score), _ratio(r.worst), *(_ms(r.records.get(p)) for p in measured_pairs)])
    columns = [("rank", "---:"), ("configuration", ":---"), ("score", "---:"), ("worst", "---:")]
    columns += [(f"{case} {policy} ms", "---:") for case, policy in measured_pairs]
    return report.table_lines(rows, columns)


def _not_measured(run: TuneRun, backend: str) -> list[str]:
    skipped = [r for r in run.records if r.backend == backend and r.status != OK]
    rows = [[r.case, r.policy, format_config(r.config) or report.DASH, report.status_text(r)] for r in skipped]
    if not rows:
        return []
    columns = [("case", ":---"), ("policy", ":---"), ("configuration", ":---"), ("why not measured", ":---")]
    return ["", "### Not measured", "", *report.table_lines(rows, columns)]


def markdown(run: TuneRun) -> str:
    """The sweep as Markdown: device, versions, copy bandwidth and limits, then one section per backend."""
    lines = _header(run)
    for backend in dict.fromkeys(r.backend for r in run.records):
        lines += ["", f"## {backend}", ""]
        if backend in run.stopped:
            lines += [f"*Stopped: {run.stopped[backend]}.*"]
        ranked = ranking(run, backend)
        if ranked:
            lines += [""] if backend in run.stopped else []
            lines += _best_overall(run, backend, ranked)
            lines += ["", "### Best configuration per case", "", *_per_case(run, backend, ranked)]
            lines += ["", "### Every configuration, best score first", "", *_all_configs(run, backend, ranked)]
        lines += _not_measured(run, backend)
    return "\n".join(lines) + "\n"


def write_report(run: TuneRun, directory: Path, stem: str = STEM) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.md"
    path.write_text(markdown(run))
    return path


def main_report(json_path: Path, directory: Path | None = None) -> int:
    """Redraw the Markdown of a sweep's JSON beside it (or into ``directory``); exit status 0, or 1 if unreadable."""
    try:
        run = TuneRun.from_json(json_path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"adam-gpu tune --report: cannot read {json_path}: {error}", file=sys.stderr)
        return 1
    print(f"wrote {write_report(run, json_path.parent if directory is None else directory, json_path.stem)}")
    return 0
