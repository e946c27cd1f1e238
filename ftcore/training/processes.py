"""Processes and ranks: where this process stands in a multi-process run, starting the ranks through a
strategy plugin, and ending a rank cleanly."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def in_launched_rank() -> bool:
    """True inside a process a per-process launcher started (torchrun, deepspeed, accelerate set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    """This process's global rank (0 outside a multi-process run)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the run, over all machines (1 outside a multi-process run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a multi-process run (or the only process): the one that writes the run's outputs."""
    return rank() == 0


def rank_prefixed(log: Callable[[str], None]) -> Callable[[str], None]:
    """A logger that prefixes each line with this process's rank."""
    prefix = f"[rank {os.environ.get('RANK', '?')}] "
    return lambda message: log(prefix + message)


def leave_process_group() -> None:
    """End this process's membership of its process group, just before the process exits.

    Left to the interpreter's teardown, the group's communication threads are torn down with
    the C++ libraries' static objects, the likeliest cause of a finished rank that once aborted
    there ("terminate called without an active exception"; its launcher then reports a failed
    run). Called by ``ftcore run`` (the command each launched rank runs), not by the library: an
    application that calls ``ftcore.run`` in its own ranks keeps its process group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_worker_rank(status: int) -> None:
    """Exit a launched rank other than rank 0 as soon as its part of the run is done.

    Such a rank writes nothing and reports nothing, so nothing of the run waits on the
    interpreter's teardown, where C++ libraries' static destructors once aborted a rank that
    had finished (SIGABRT, reported by the launcher as a failed run). Its output is flushed
    first. Rank 0 and single-process runs exit normally (trackers finish in atexit handlers).
    """
    if not in_launched_rank() or is_main_process():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
