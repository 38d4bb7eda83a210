"""How much memory the benchmark may fill: free device memory on a GPU; on the CPU the memory the operating
system says it can give without swapping (psutil where installed, else Linux's /proc/meminfo MemAvailable)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

MEMINFO = Path("/proc/meminfo")
# Where neither psutil nor /proc/meminfo answers (macOS without psutil): a laptop's worth.
FALLBACK_BYTES = 8 * 2**30


def meminfo_available(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable of a /proc/meminfo file in bytes (the kernel writes kB), or None where it has none."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024
    return None


def host_available() -> int:
    """Bytes of host memory available now."""
    try:
        import psutil
    except ImportError:
        available = meminfo_available()
        return FALLBACK_BYTES if available is None else available
    return psutil.virtual_memory().available


def free_bytes(device: torch.device) -> int:
    """Bytes a case may still fill on ``device``."""
    if device.type != "cuda":
        return host_available()
    gc.collect()
    torch.cuda.empty_cache()  # the last case's sets, freed but cached by torch, count as used otherwise
    free, _ = torch.cuda.mem_get_info(device)
    return free
