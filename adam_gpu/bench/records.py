"""One benchmark measurement as a long-format record, and the JSON file that holds a run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

# What a record's status says.
OK = "ok"
NOT_INSTALLED = "not installed"
UNSUPPORTED = "unsupported"
ERROR = "error"
TOO_SLOW = "too slow"  # its first step said the measurement would run past the case time limit
GRAPH_FAILED = "CUDA graph failed"  # starts the reason of an OK record whose step could not be captured
# Noise: a measurement whose samples spread, (p80 - p20) / median, wider than this is marked wide in the report
# (the spreads this was chosen from: benchmarks/README.md, "Running on a CPU").
WIDE_SPREAD = 0.25


@dataclass
class Record:
    """One contender stepping one case under one precision policy.

    Times are milliseconds per ``step()``: median and 20th/80th percentiles of device time (CUDA
    events) on a GPU, of wall time on the CPU. ``bytes_per_param`` is what one step must move (read +
    write); ``gbps`` = bytes moved / median time; ``pct_copy`` = 100 * gbps / the copy bandwidth
    measured in the same run, in percent; ``speedup_vs_torch_fused`` = torch fused's median / this
    median, same case and policy.
    """

    contender: str  # e.g. "adam-gpu triton", "torch fused"
    family: str  # "adam-gpu", "torch", or the external package's name
    case: str  # e.g. "flat 2^20", "gpt2-124m"
    policy: str  # "fp32", "bf16", "bf16+fp32-moments"
    numel: int
    tensors: int
    status: str = OK  # OK, NOT_INSTALLED, UNSUPPORTED, TOO_SLOW, or "error: ..."
    reason: str = ""  # why not measured; for an OK record, why it has no CUDA-graph time (GRAPH_FAILED: ...)
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    graph_median_ms: float | None = None  # CUDA graph replay, for launch-bound cases
    host_ms: float | None = None  # CPU time spent inside step() (launch overhead), median
    bytes_per_param: float | None = None
    state_bytes_per_param: float | None = None
    gbps: float | None = None
    pct_copy: float | None = None
    speedup_vs_torch_fused: float | None = None
    speedup_vs_torch_foreach: float | None = None
    seconds: float | None = None  # wall time spent measuring it (setup, timing, capture): for planning runs

    @property
    def spread(self) -> float | None:
        """(p80 - p20) / median of the timed samples, or None where not measured."""
        if self.median_ms is None or self.p20_ms is None or self.p80_ms is None or self.median_ms <= 0:
            return None
        return (self.p80_ms - self.p20_ms) / self.median_ms

    @property
    def wide(self) -> bool:
        """The samples spread more than WIDE_SPREAD: its median, and any ratio drawn from it, is noisy."""
        return self.spread is not None and self.spread > WIDE_SPREAD


@dataclass
class Run:
    """A whole benchmark run: the environment, the copy bandwidth measured in it (GB/s, read + write
    counted), and its records. ``environment`` keys: device, device_type ("cuda"/"cpu"), driver, adam_gpu,
    torch, triton, cupy, python, date, quick, plan ("quick", "default" or "full"), threads (torch's
    on the CPU); older runs lack the last two.
    ``time_limit_s``: the limit it ran under (None: none); ``case_time_limit_s``: the most one measurement was
    let run (TOO_SLOW records were skipped by it; None: none); ``elapsed_s``: what it took (None: stopped
    before the end); ``not_measured``: the "case, policy" pairs the time limit left out; ``merged_from``: where
    ``merged`` made it of several runs, each one's date, copy bandwidth and number of pairs it gave. A subclass
    with its own record type (``adam-gpu tune``'s) sets ``record_type`` and may add fields; the JSON round trip
    keeps them."""

    record_type: ClassVar[type[Record]] = Record

    environment: dict[str, Any]
    copy_gbps: float
    records: list[Record] = field(default_factory=list)
    time_limit_s: float | None = None
    case_time_limit_s: float | None = None
    elapsed_s: float | None = None
    not_measured: list[str] = field(default_factory=list)
    merged_from: list[dict[str, Any]] = field(default_factory=list)  # per run merged in: date, copy_gbps, pairs

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: Path) -> Run:
        data = json.loads(path.read_text())
        names = {f.name for f in fields(cls.record_type)}
        records = [cls.record_type(**{k: v for k, v in r.items() if k in names}) for r in data["records"]]
        # environment and copy_gbps, and a subclass's own fields where the file has them
        run_fields = {f.name: data[f.name] for f in fields(cls) if f.name != "records" and f.name in data}
        return cls(**run_fields, records=records)

    @classmethod
    def merged(cls, runs: Sequence[Run]) -> Run:
        """One run of several on one device and software (a run its time limit stopped, and reruns of the pairs
        it left): each (case, policy) pair's records from the last run that measured it, so that speed-ups stay
        within one run; each record keeps the % of copy bandwidth of its own run. The environment and copy
        bandwidth are the first run's; ``merged_from`` lists them all; ``elapsed_s`` is their sum."""
        if not runs:
            raise ValueError("no runs to merge")
        keys = ("device", "device_type", "adam_gpu", "torch", "triton", "cupy", "quick")
        first = runs[0].environment
        for run in runs[1:]:
            differ = [key for key in keys if run.environment.get(key) != first.get(key)]
            if differ:
                raise ValueError(f"runs differ in {', '.join(differ)}: only runs on one device and software merge")
        by_pair: dict[tuple[str, str], list[Record]] = {}
        parts = []
        for run in runs:
            pairs: dict[tuple[str, str], list[Record]] = {}
            for record in run.records:
                pairs.setdefault((record.case, record.policy), []).append(record)
            by_pair.update(pairs)  # (a pair measured again replaces the earlier records, in its first place)
            date = run.environment.get("date")
            parts += run.merged_from or [{"date": date, "copy_gbps": run.copy_gbps, "pairs": len(pairs)}]
        measured = {f"{case}, {policy}" for case, policy in by_pair}
        left = [pair for run in runs for pair in run.not_measured if pair not in measured]
        return cls(
            environment=dict(first),
            copy_gbps=runs[0].copy_gbps,
            records=[record for records in by_pair.values() for record in records],
            time_limit_s=runs[0].time_limit_s if left else None,
            case_time_limit_s=runs[0].case_time_limit_s,
            elapsed_s=None if any(run.elapsed_s is None for run in runs) else sum(run.elapsed_s for run in runs),
            not_measured=list(dict.fromkeys(left)),
            merged_from=parts,
        )
