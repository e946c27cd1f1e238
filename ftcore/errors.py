"""Errors a user can cause, and the exit statuses the CLI maps them to.

Exit statuses (documented in docs/reference/exit-codes.md):
    0   success
    1   internal error (a bug of ours: a traceback is shown)
    2   user error (bad config, data, plugin selection, paths): a message, no traceback
    3   interrupted: a resumable checkpoint was saved
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_INTERRUPTED = 3


class FtcoreError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback."""

    exit_code = EXIT_USER


class ConfigError(FtcoreError):
    """The run configuration is invalid."""


class PluginError(FtcoreError):
    """A plugin could not be found, selected or loaded."""


class DataError(FtcoreError):
    """The training data is missing, empty or malformed."""


class OutputError(FtcoreError):
    """The run's outputs cannot be written (disk full, no permission); nothing partial is kept."""


class Interrupted(FtcoreError):
    """Training stopped on SIGTERM/SIGINT after saving a resumable checkpoint."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, checkpoint: str | None = None, step: int | None = None,
                 signal: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step
        self.signal = signal


class Stopped(BaseException):
    """A signal stopped the run outside training (before it started, or while it was finishing).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` in a library swallows
    it on the way out; the cleanup it passes through (the output guard, the atomic saves) runs.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PluginFailure(PluginError):
    """A plugin's hook raised an unexpected exception: a bug in that plugin, named with its package.

    Its exit status is the internal-error one, and the CLI shows the traceback for the plugin's author.
    """

    exit_code = EXIT_INTERNAL


def suggest(word: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or '' when none is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' Did you mean "{match[0]}"?' if match else ""
