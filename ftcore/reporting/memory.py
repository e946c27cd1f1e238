"""Memory figures of this process: peak resident memory (VmHWM) and, on a GPU, torch's CUDA peak."""

from __future__ import annotations

import sys


def peak_memory() -> dict[str, int | None]:
    """Peak resident memory of this process (bytes) and, on a GPU, its CUDA peak: torch's peak allocation plus
    the optimizer state a paged optimizer holds in CUDA managed memory (which torch's allocator never sees)."""
    import resource

    rss = own_peak_rss()
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = rss if sys.platform == "darwin" else rss * 1024   # Linux reports KiB, macOS bytes
    cuda = paged = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            paged = paged_state_bytes()
            cuda = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) + paged
    except Exception:  # pragma: no cover - a broken CUDA setup must not fail the end of a run
        cuda = None
    figures: dict[str, int | None] = {"peak_rss_bytes": int(rss), "peak_cuda_bytes": cuda}
    if paged:
        figures["paged_optimizer_bytes"] = paged
    return figures


def paged_state_bytes() -> int:
    """Bytes of the tensors bitsandbytes' paged optimizers allocated (cudaMallocManaged, outside torch's
    allocator): they stay on the GPU until memory runs short, so they count towards its peak."""
    if "bitsandbytes" not in sys.modules:
        return 0
    from bitsandbytes.functional import GlobalPageManager

    return sum(t.numel() * t.element_size() for t in GlobalPageManager.get_instance().paged_tensors)


def proc_status() -> dict[str, int]:
    """The memory figures of /proc/self/status (VmHWM, VmRSS, RssAnon, RssFile, ...) in bytes; {} without /proc."""
    found: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    found[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return found


def own_peak_rss() -> int | None:
    """This process's own peak RSS in bytes (Linux VmHWM), or None where /proc is not there.

    Not getrusage()'s ru_maxrss: Linux keeps ru_maxrss across exec(), so a run started by a
    larger process (a launcher, a notebook, a benchmark driver) would report that process's peak.
    """
    return proc_status().get("VmHWM")
