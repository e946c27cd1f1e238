"""Processes and ranks: where this process stands in a multi-process run, starting the ranks (the launchers
strategy plugins call from ``ftcore_launch``: PyTorch's elastic launcher, or a hostfile), and ending a rank
cleanly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftcore.errors import EXIT_INTERRUPTED


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


# -- starting the ranks (what strategy plugins' ftcore_launch hooks call) --------------------------------

@contextmanager
def child_env(per_machine: int) -> Iterator[None]:
    """Environment the ranks inherit: unbuffered output (logs stream), Python's stacks on a fatal signal
    (a rank that aborts or segfaults shows where), one OpenMP thread per rank like torchrun."""
    wanted = {"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": os.environ.get("PYTHONFAULTHANDLER") or "1"}
    if "OMP_NUM_THREADS" not in os.environ and per_machine > 1:
        wanted["OMP_NUM_THREADS"] = "1"
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    """A TCP port free on this machine now (for a one-machine run's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_with_torchrun(argv: list[str], launch: Any, log: Callable[[str], None], what: str,
                         shutdown_timeout: int = 10) -> int:
    """Start this machine's ranks with PyTorch's elastic launcher (what ``torchrun`` runs), static rendezvous.

    ``launch`` is the run's ``launch`` section (processes, machines, this machine's rank, the main
    machine's address and port); each rank runs ``python -u *argv``. Their output streams through;
    when one fails the others are stopped (after ``shutdown_timeout`` seconds) and its exit status is
    returned; ``what`` names the strategy in the log line.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    per_machine = launch.num_processes // launch.num_machines
    single = launch.num_machines == 1
    addr = launch.main_process_ip or "127.0.0.1"
    port = launch.main_process_port
    if single and "main_process_port" not in launch.model_fields_set:
        port = free_port()   # one machine: any free port, so concurrent runs do not collide
    elastic = LaunchConfig(
        min_nodes=launch.num_machines, max_nodes=launch.num_machines, nproc_per_node=per_machine,
        run_id=f"ftcore-{addr}-{port}", role="ftcore", rdzv_backend="static", rdzv_endpoint=f"{addr}:{port}",
        rdzv_configs={"rank": launch.machine_rank, "timeout": 900}, max_restarts=0, monitor_interval=0.5,
        start_method="spawn", shutdown_timeout=shutdown_timeout,
    )
    where = "" if single else f" on machine {launch.machine_rank} of {launch.num_machines} ({addr}:{port})"
    log(f"launching {per_machine} process(es){where} with {what} (torch.distributed elastic launcher)")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    started = time.time()
    with child_env(per_machine):
        try:
            elastic_launch(elastic, sys.executable)("-u", *argv)
        except ChildFailedError as exc:
            failed_rank, failure = exc.get_first_failure()
            code = failure.exitcode
            status = code if code and code > 0 else 1
            after = f"after {time.time() - started:.0f}s"
            if code == EXIT_INTERRUPTED:
                log(f"the ranks were interrupted {after} and stopped after saving a checkpoint (their output above "
                    f"says where): continue with the same command and --resume auto.")
            elif code is not None and code < 0:
                log(f"error: rank {failed_rank} was killed by {_signal_name(-code)} {after}; the other ranks were "
                    f"stopped. Continue from the last complete checkpoint with the same command and --resume auto.")
            else:
                log(f"error: rank {failed_rank} failed with exit status {code} {after} (its output is above); the "
                    f"other ranks were stopped.")
            return status
        except SignalException as exc:      # Ctrl-C or a scheduler's SIGTERM: the agent stopped the ranks
            log(f"error: interrupted by {exc.sigval.name}; the ranks were stopped.")
            return 128 + int(exc.sigval)
    return 0


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def read_hostfile(path: str) -> dict[str, int]:
    """``host slots=N`` lines (DeepSpeed's format); comments and blank lines are skipped."""
    from ftcore.errors import ConfigError

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"launch.hostfile {file} not found.")
    hosts: dict[str, int] = {}
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = parts[1].removeprefix("slots=") if len(parts) == 2 and parts[1].startswith("slots=") else ""
        if not slots.isdigit() or int(slots) < 1:
            raise ConfigError(f"{file}:{number}: expected 'HOST slots=N' (N processes on that host), got {line!r}.")
        hosts[parts[0]] = int(slots)
    if not hosts:
        raise ConfigError(f"launch.hostfile {file} lists no host.")
    return hosts


def hostfile_launcher_command(argv: list[str], launch: Any) -> list[str]:
    """The command that starts a hostfile run: DeepSpeed's launcher (it starts every host over ssh/pdsh and
    sets each rank's RANK, LOCAL_RANK and WORLD_SIZE; the ranks need not use DeepSpeed themselves)."""
    from ftcore.errors import ConfigError

    hosts = read_hostfile(launch.hostfile)
    if argv[:1] != ["-m"]:
        raise ConfigError(f"cannot launch {argv!r} with DeepSpeed's launcher: expected a module (-m).")
    port = launch.main_process_port
    if len(hosts) == 1 and "main_process_port" not in launch.model_fields_set:
        port = free_port()   # one host: any free port, so concurrent runs do not collide
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(launch.hostfile),
           "--master_port", str(port), "--no_local_rank", "--log_level", "warning"]
    if launch.main_process_ip:
        cmd += ["--master_addr", launch.main_process_ip]
    if len(hosts) == 1:
        # One host: nothing to reach over ssh (DeepSpeed would still insist on checking it).
        cmd += ["--no_ssh_check"] + ([] if launch.main_process_ip else ["--master_addr", "127.0.0.1"])
    fields = launch.model_fields_set
    if "num_machines" in fields:
        cmd += ["--num_nodes", str(launch.num_machines)]
    if "num_processes" in fields:
        cmd += ["--num_gpus", str(launch.num_processes // launch.num_machines)]
    return cmd + ["--module", *argv[1:]]


def launch_with_hostfile(argv: list[str], launch: Any, log: Callable[[str], None]) -> int:
    """Start the ranks on every host of ``launch.hostfile`` (DeepSpeed's launcher, installed with
    ``ftcore[deepspeed]``), wait for them and return the exit status."""
    import importlib.util

    from ftcore.errors import ConfigError

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("launch.hostfile starts the hosts with DeepSpeed's launcher, which is not installed: "
                          "pip install 'ftcore[deepspeed]', or give --num-machines / --machine-rank / "
                          "--main-process-ip and start ftcore on each machine.")
    cmd = hostfile_launcher_command(argv, launch)
    hosts = read_hostfile(launch.hostfile)
    log(f"launching on {len(hosts)} host(s) from {launch.hostfile} ({sum(hosts.values())} slots) "
        f"with DeepSpeed's launcher")
    with child_env(max(hosts.values())):
        proc = subprocess.Popen(cmd)
        try:
            status = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            status = proc.wait()
    if status:
        log(f"error: the DeepSpeed launcher ended with exit status {status} (a rank's output above says why); "
            f"it stops the other ranks when one fails.")
    return status
