"""The output directory of a run: a failure before training leaves it as it was.

A run that stops on a user error (bad data, a missing tokenizer, a plugin that refuses)
before training starts removes what it wrote, so the fixed command can simply be rerun;
with ``--overwrite`` the previous run is only set aside until training starts, and put
back if the new run fails first.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from ftcore import runfolder
from ftcore.errors import ConfigError
from ftcore.files import write_json_atomic, write_text_atomic
from ftcore.types import RunContext
from ftcore.version import __version__


class OutputGuard:
    """Tracks what a run did to its output directory, to undo it when the run fails early."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created = not path.exists()
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
        if self.committed or self.had_files:
            return   # a resumed run's folder, or one training already wrote checkpoints into
        if self.path.exists():
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
