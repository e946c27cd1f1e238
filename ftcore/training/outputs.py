"""The output directory of a run: one run owns it at a time, and a failure before training leaves it as it was.

``OutputLock``: a run holds an exclusive lock on its output folder (an ``flock`` on the sibling
file ``.NAME.lock``) from before it looks at the folder until it ends; a second run, an
``--overwrite`` or a ``--resume`` against a live run is refused, naming that run's process. The
kernel drops the lock when its process dies, however it dies, so a killed run's lock is simply
taken over.

``OutputGuard``: a run that stops (a user error, a signal) before training starts removes what
it wrote, so the fixed command can simply be rerun; with ``--overwrite`` the previous run is
only set aside until training starts, and put back if the new run stops first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ftcore import runfolder
from ftcore.errors import ConfigError
from ftcore.files import write_json_atomic, write_text_atomic
from ftcore.types import RunContext
from ftcore.version import __version__

LOCK_ENV = "FTCORE_OUTPUT_LOCKED"   # set for the ranks a launching run starts: it holds their folder's lock


class OutputLock:
    """An exclusive lock on a run's output folder, held for the whole run."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.lock"
        self.fd: int | None = None
        self.taken_over: dict | None = None
        self.unlocked: str | None = None   # why the folder could not be locked (a filesystem without locks)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the run that holds it; never waits."""
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"output path {self.out}: {_first_file(parent)} is a file, not a folder, so the output "
                              f"folder cannot be made under it. Choose another --output.") from None
        except PermissionError:
            raise ConfigError(f"output path {self.out}: no permission to create its folder {parent}. Choose an "
                              f"--output where you can write.") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:
                raise ConfigError(f"output path {self.out}: no permission to write in {parent}. Choose an --output "
                                  f"where you can write.") from None
            except OSError as exc:
                raise ConfigError(f"output path {self.out}: cannot write in {parent} ({exc.strerror}). Choose "
                                  f"another --output.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise ConfigError(f"output directory {self.out} is in use by another ftcore run ({_describe(holder)}): "
                                  f"one run writes an output directory at a time. Wait for it to end, or choose "
                                  f"another --output.") from None
            except OSError as exc:   # a filesystem without locks (some network mounts): see docs/safety.md
                self.fd = fd
                self.unlocked = exc.strerror or type(exc).__name__
                return
            if _same_file(fd, self.path):
                break
            os.close(fd)   # the file was replaced after we opened it (its holder released it): take the new one
        previous = _read_holder(fd)
        self.taken_over = previous or None   # a holder recorded but no lock held: that run died without releasing
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "argv": sys.argv}).encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()   # unlinked while still locked: a waiting run retries on the new file
        except OSError:
            pass
        os.close(self.fd)   # drops the lock
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 1 << 16).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "its process is not recorded"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"process {holder.get('pid')} on {holder.get('host')}, started {started}"


def _first_file(path: Path) -> Path:
    """The nearest of ``path`` and its parents that exists and is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return path


def recover_stranded(out: Path, log: Callable[[str], None]) -> None:
    """Put back a previous run that an --overwrite set aside and never got to delete or restore.

    A run killed (SIGKILL, a crash of the machine) between setting the previous run aside and the
    start of training leaves it as ``.NAME.previous-PID``. Called with the output lock held, so no
    live run owns it: when the folder now holds no trained output, the previous run goes back;
    when it does (training had started), the leftover is deleted.
    """
    for stranded in sorted(out.parent.glob(f".{out.name}.previous-*")):
        trained = out.is_dir() and any((out / name).exists() for name in (runfolder.CHECKPOINTS, *runfolder.SAVED_MODEL_DIRS))
        if trained:
            shutil.rmtree(stranded, ignore_errors=True)
            continue
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(stranded, out)
        log(f"warning: put back the previous run in {out}: an --overwrite run was stopped before it began training "
            f"and left it aside as {stranded.name}")


class OutputGuard:
    """Tracks what a run did to its output directory, to undo it when the run fails early."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created = not path.exists()
        self.was_dir = path.is_dir()
        self.had_files = path.is_dir() and any(path.iterdir())
        self.previous: Path | None = None
        self.committed = False

    def set_aside(self) -> None:
        """Move the previous run out of the way (instead of deleting it) until training starts."""
        self.previous = self.path.with_name(f".{self.path.name}.previous-{os.getpid()}")
        if self.previous.exists():
            shutil.rmtree(self.previous)
        os.replace(self.path, self.previous)
        self.had_files = False

    def commit(self) -> None:
        """Training starts: the previous run (replaced as asked with --overwrite) is deleted now."""
        self.committed = True
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = None

    def undo(self) -> None:
        """The run failed before training: remove what it wrote and put back what was there."""
        if self.committed or self.had_files or (not self.created and not self.was_dir):
            return   # a resumed run's folder, one training already wrote into, or a path that was never a folder
        if self.path.is_dir():
            if self.created or self.previous is not None:
                shutil.rmtree(self.path, ignore_errors=True)
            else:
                for child in self.path.iterdir():   # an empty folder the user made: keep it empty
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        if self.previous is not None:
            os.replace(self.previous, self.path)
            self.previous = None


# -- may this run write there? ------------------------------------------------------------

def check_output_dir(out: Path, overwrite: bool, resuming: bool = False) -> None:
    """Raise ConfigError when the run may not write to ``out``; change nothing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory: choose another --output.")
    if resuming and out.exists() and any(out.iterdir()) and not runfolder.is_run(out):
        raise ConfigError(f"output directory {out} holds files that are not an ftcore run: nothing to resume "
                          f"there. Choose another --output.")
    if out.exists() and any(out.iterdir()) and not resuming:
        if not overwrite:
            what = "another run's results" if runfolder.is_run(out) else "files"
            raise ConfigError(f"output directory {out} already holds {what}. Pass --overwrite to replace it, "
                              f"or choose another --output.")
        if not runfolder.is_run(out):
            raise ConfigError(f"output directory {out} holds files that are not an ftcore run; "
                              f"--overwrite only replaces ftcore runs. Choose another --output.")


def prepare_output_dir(out: Path, overwrite: bool, resuming: bool = False, guard: OutputGuard | None = None
                       ) -> Path:
    """Refuse to write over another run's results unless asked; never touch other files."""
    check_output_dir(out, overwrite, resuming)
    if out.exists() and any(out.iterdir()) and not resuming:
        if guard is not None:
            guard.set_aside()   # deleted once training starts; put back if this run fails first
        else:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_run_files(ctx: RunContext) -> Path:
    """The resolved config, the plugin list and the run marker, so the run can be repeated from its output."""
    out = ctx.output_dir
    data = ctx.config.to_dict()
    data["overwrite"] = False
    data["resume"] = None
    path = out / runfolder.CONFIG
    write_text_atomic(path, "# Resolved ftcore configuration; rerun with: ftcore run config.yaml\n"
                      + yaml.safe_dump(data, sort_keys=False))
    write_json_atomic(out / runfolder.PLUGINS, ctx.plugins.versions())
    write_json_atomic(out / runfolder.MARKER, {"ftcore_version": __version__, "started": time.time(),
                                               "argv": sys.argv, "precision": ctx.precision,
                                               "base_model_license": ctx.base_model_license})
    return path
