"""The output directory of a run: a failure before training leaves it as it was.

A run that stops on a user error (bad data, a missing tokenizer, a plugin that refuses)
before training starts removes what it wrote, so the fixed command can simply be rerun;
with ``--overwrite`` the previous run is only set aside until training starts, and put
back if the new run fails first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
