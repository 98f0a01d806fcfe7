"""What the machine did during a benchmark: the share of CPU time the hypervisor took from it (steal)."""
from __future__ import annotations

from pathlib import Path


def cpu_steal() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat ((0, 0) where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(a: tuple[int, int], b: tuple[int, int]) -> float:
    """The share of CPU time between two `cpu_steal()` readings that the hypervisor took (steal)."""
    return (b[0] - a[0]) / max(1, b[1] - a[1])
