"""Memory of this process: CUDA allocated on a CUDA device, else the resident set size; now and at its peak.

    reset_peak_memory()
    train_step()
    print(format_bytes(peak_memory()), format_bytes(current_memory()))

Estimating the memory of a configuration before running it is scaling.training.memory_estimate.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


def peak_memory(device: torch.device | str | None = None) -> int:
    """Peak bytes of this process: CUDA max allocated on a CUDA device, else the peak resident set size."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = proc_status_kib("VmHWM")  # the high-water mark that reset_peak_memory() can reset
    if hwm:
        return hwm * 1024
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_memory(device: torch.device | str | None = None) -> int:
    """Bytes in use now: CUDA allocated, or the resident set size on CPU."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return proc_status_kib("VmRSS") * 1024


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Start a new peak window: CUDA peak stats, or the kernel's RSS high-water mark (Linux) on CPU."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        # "5" resets VmHWM (the peak RSS) to the current RSS; getrusage keeps the lifetime peak.
        clear_refs.write_text("5")


def format_bytes(n: float) -> str:
    """Bytes as a short human string (GiB/MiB/KiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def default_device() -> torch.device:
    """The current CUDA device, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def proc_status_kib(field: str, path: str | Path = "/proc/self/status") -> int:
    """A `Field:  N kB` line of /proc/self/status (or /proc/meminfo); 0 where there is no procfs."""
    status = Path(path)
    if not status.exists():
        return 0
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0
