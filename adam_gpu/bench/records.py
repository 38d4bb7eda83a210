"""One benchmark measurement as a long-format record, and the JSON file that holds a run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

# What a record's status says.
OK = "ok"
NOT_INSTALLED = "not installed"
UNSUPPORTED = "unsupported"
ERROR = "error"
GRAPH_FAILED = "CUDA graph failed"  # starts the reason of an OK record whose step could not be captured


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
    status: str = OK  # OK, NOT_INSTALLED, UNSUPPORTED, or "error: ..."
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


@dataclass
class Run:
    """A whole benchmark run: the environment, the copy bandwidth measured in it (GB/s, read + write
    counted), and its records. ``environment`` keys: device, device_type ("cuda"/"cpu"), driver,
    adam_gpu, torch, triton, cupy, python, date, quick. ``time_limit_s``: the limit it ran under (None:
    none); ``elapsed_s``: what it took (None: stopped before the end); ``not_measured``: the "case, policy"
    pairs the time limit left out. A subclass with its own record type (``adam-gpu tune``'s) sets
    ``record_type`` and may add fields; the JSON round trip keeps them."""

    record_type: ClassVar[type[Record]] = Record

    environment: dict[str, Any]
    copy_gbps: float
    records: list[Record] = field(default_factory=list)
    time_limit_s: float | None = None
    elapsed_s: float | None = None
    not_measured: list[str] = field(default_factory=list)

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
