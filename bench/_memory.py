"""Resident-memory figures of this process for the benchmarks (Linux /proc)."""

from __future__ import annotations


def status_mib(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> float:
    """Restart the kernel's resident high-water mark (VmHWM) at the current RSS, so an earlier
    peak (weights loaded twice over, a previous benchmark) is not counted; returns that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS")


def peak_since_reset() -> float:
    """Peak RSS (MiB) since the last :func:`reset_peak`."""
    return status_mib("VmHWM")
