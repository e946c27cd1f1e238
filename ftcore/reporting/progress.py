"""How a run talks to its user: live progress in a terminal, plain lines, JSON lines, or quiet.

The engine and plugins log through ``ctx.log(message)``; that object is a :class:`Reporter`,
which is also a plain callable, so ``ftcore.run(..., log=print)`` keeps working for library
users (their callable receives every line). On top of messages a reporter gets a few
structured events:

    phase(name)            a context manager around data preparation and export
    train_begin(...)       training starts (total steps, epochs)
    train_update(...)      after every optimizer step (step, epoch, tokens/s)
    train_log(row)         a log event of the trainer (loss, lr, eval loss, ...)
    train_end()
    summary(result)        the end-of-run table

Modes (``make_reporter``): ``rich`` (a live display on stderr; the default in a terminal),
``plain`` (one line per event on stderr; the default otherwise), ``json`` (one JSON object
per event on stdout, nothing else there) and ``quiet`` (warnings and errors only).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from ftcore.errors import ConfigError
from ftcore.reporting.summary import fmt_duration, fmt_number, render_summary_text, summary_rows_dict, summary_table

MODES = ("auto", "rich", "plain", "json", "quiet")
TRAIN_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm")


def level_of(message: str) -> str:
    """Messages are plain strings; a ``warning:`` / ``error:`` prefix sets their level."""
    head = message.lstrip().split(":", 1)[0].lower()
    return head if head in ("warning", "error") else "info"


class Reporter:
    """Plain line logs through ``write`` (stderr by default); the base of every mode."""

    mode = "plain"

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self.write = write or _stderr
        self.total_steps = 0
        self.started = time.time()
        self.train_started: float | None = None
        self.last: dict[str, Any] = {}
        self.warnings: list[str] = []   # kept for the run report

    # -- messages --------------------------------------------------------------
    def __call__(self, message: str) -> None:
        message = str(message)
        if level_of(message) != "info":
            self.warnings.append(message)
        self.message(message)

    def message(self, text: str, level: str | None = None) -> None:
        self.write(text)

    # -- phases ----------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.time()
        self.phase_begin(name)
        try:
            yield
        finally:
            self.phase_end(name, time.time() - began)

    def phase_begin(self, name: str) -> None:
        self.write(f"{name}...")

    def phase_end(self, name: str, seconds: float) -> None:
        pass

    # -- training --------------------------------------------------------------
    def train_begin(self, total_steps: int, epochs: float | None = None) -> None:
        self.total_steps = total_steps
        self.train_started = time.time()
        self.write(f"training: {total_steps} steps" + (f", {epochs:g} epoch{'s' if epochs != 1 else ''}" if epochs else ""))

    def train_update(self, step: int, epoch: float, tokens: int, elapsed: float) -> None:
        self.last.update(step=step, epoch=epoch, tokens_per_s=tokens / elapsed if elapsed > 0 else None)

    def repeated_eval(self, row: dict[str, Any]) -> bool:
        """The engine's final evaluation repeats the last one when training ended on an evaluation."""
        if "eval_loss" not in row:
            return False
        key = (row.get("step"), row["eval_loss"])
        seen, self.last_eval = getattr(self, "last_eval", None), key
        return seen == key

    def train_log(self, row: dict[str, Any]) -> None:
        shown = {k: row[k] for k in TRAIN_KEYS if k in row}
        if not shown or self.repeated_eval(row):
            return
        self.last.update(shown)
        step = row.get("step", 0)
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}",
                 f"epoch {row.get('epoch') or 0:.2f}"]
        parts += [f"{k}={fmt_number(v)}" for k, v in shown.items()]
        if "loss" in shown and row.get("tokens_per_s"):
            parts.append(f"tok/s={row['tokens_per_s']:.0f}")
            parts.append(f"eta {fmt_duration(self.eta(step))}")
        self.write(" ".join(parts))

    def train_end(self) -> None:
        pass

    def eta(self, step: int) -> float | None:
        if not self.train_started or step <= 0 or not self.total_steps:
            return None
        return (time.time() - self.train_started) / step * max(self.total_steps - step, 0)

    # -- the end ---------------------------------------------------------------
    def summary(self, result: Any) -> None:
        self.write(render_summary_text(result))

    def close(self) -> None:
        pass

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class QuietReporter(Reporter):
    """Warnings and errors only."""

    mode = "quiet"

    def message(self, text: str, level: str | None = None) -> None:
        if (level or level_of(text)) != "info":
            self.write(text)

    def phase_begin(self, name: str) -> None:
        pass

    def train_begin(self, total_steps: int, epochs: float | None = None) -> None:
        self.total_steps = total_steps
        self.train_started = time.time()

    def train_log(self, row: dict[str, Any]) -> None:
        pass

    def summary(self, result: Any) -> None:
        pass


class JsonReporter(Reporter):
    """One JSON object per line, each with ``event`` and ``time``; meant for machines."""

    mode = "json"

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream

    def __enter__(self) -> "JsonReporter":
        """Keep stdout for JSON only: whatever else prints there (library chatter) goes to stderr meanwhile."""
        if self.stream is None:
            self.stream = sys.stdout
            self._saved_stdout = sys.stdout
            sys.stdout = sys.stderr
        return self

    def close(self) -> None:
        saved = getattr(self, "_saved_stdout", None)
        if saved is not None:
            sys.stdout = saved
            self._saved_stdout = None

    def emit(self, event: str, **fields: Any) -> None:
        stream = self.stream or sys.stdout
        stream.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str) + "\n")
        stream.flush()

    def message(self, text: str, level: str | None = None) -> None:
        self.emit("message", level=level or level_of(text), message=text)

    def phase_begin(self, name: str) -> None:
        self.emit("phase_start", phase=name)

    def phase_end(self, name: str, seconds: float) -> None:
        self.emit("phase_end", phase=name, seconds=round(seconds, 3))

    def train_begin(self, total_steps: int, epochs: float | None = None) -> None:
        self.total_steps = total_steps
        self.train_started = time.time()
        self.emit("train_start", total_steps=total_steps, epochs=epochs)

    def train_log(self, row: dict[str, Any]) -> None:
        eta = self.eta(row.get("step", 0)) if "loss" in row else None
        self.emit("log", **row, total_steps=self.total_steps, **({"eta_s": round(eta, 1)} if eta is not None else {}))

    def train_end(self) -> None:
        self.emit("train_end")

    def summary(self, result: Any) -> None:
        self.emit("summary", **summary_rows_dict(result), result=result.as_dict())


class RichReporter(Reporter):
    """A live display on stderr: a spinner per phase, a training bar with loss, lr, tokens/s and ETA."""

    mode = "rich"

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console

        super().__init__()
        self.console = console or Console(stderr=True)
        self.progress: Any = None
        self.tasks: dict[str, Any] = {}

    def _live(self) -> Any:
        if self.progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.progress.start()
        return self.progress

    def message(self, text: str, level: str | None = None) -> None:
        level = level or level_of(text)
        style = {"warning": "yellow", "error": "bold red"}.get(level)
        target = self.progress.console if self.progress is not None else self.console
        target.print(text, style=style, markup=False, highlight=False)

    def phase_begin(self, name: str) -> None:
        self.tasks[name] = self._live().add_task(name, total=None, info="")

    def phase_end(self, name: str, seconds: float) -> None:
        task = self.tasks.pop(name, None)
        if task is not None and self.progress is not None:
            self.progress.update(task, total=1, completed=1, info=f"done in {seconds:.1f}s")

    def train_begin(self, total_steps: int, epochs: float | None = None) -> None:
        self.total_steps = total_steps
        self.train_started = time.time()
        self.tasks["training"] = self._live().add_task("training", total=total_steps or None, info="")

    def train_update(self, step: int, epoch: float, tokens: int, elapsed: float) -> None:
        super().train_update(step, epoch, tokens, elapsed)
        task = self.tasks.get("training")
        if task is not None:
            self.progress.update(task, completed=step, info=self._info())

    def _info(self) -> str:
        last = self.last
        parts = [f"epoch {last.get('epoch') or 0:.2f}"]
        if "loss" in last:
            parts.append(f"loss {last['loss']:.4f}")
        if "eval_loss" in last:
            parts.append(f"eval {last['eval_loss']:.4f}")
        if "learning_rate" in last:
            parts.append(f"lr {last['learning_rate']:.2e}")
        if last.get("tokens_per_s"):
            parts.append(f"{last['tokens_per_s']:.0f} tok/s")
        return " · ".join(parts)

    def train_log(self, row: dict[str, Any]) -> None:
        shown = {k: row[k] for k in TRAIN_KEYS if k in row}
        self.last.update(shown)
        if "eval_loss" in shown and not self.repeated_eval(row):
            self.message(f"step {row.get('step')} epoch {row.get('epoch') or 0:.2f} eval_loss={shown['eval_loss']:.4f}")
        task = self.tasks.get("training")
        if task is not None:
            self.progress.update(task, info=self._info())

    def train_end(self) -> None:
        task = self.tasks.pop("training", None)
        if task is not None and self.progress is not None:
            self.progress.update(task, info=self._info())

    def summary(self, result: Any) -> None:
        self.close()
        self.console.print(summary_table(result))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class CallableReporter(Reporter):
    """Wraps a library user's ``log(str)`` callable: every line goes to it."""


def make_reporter(mode: str = "auto", *, stream: TextIO | None = None) -> Reporter:
    """Build the reporter for a mode (see the module docstring); ``auto``: rich in a terminal, else plain."""
    if mode not in MODES:
        raise ConfigError(f"unknown progress mode {mode!r}; choose one of {', '.join(MODES)}.")
    if mode == "auto":
        err = stream or sys.stderr
        mode = "rich" if getattr(err, "isatty", lambda: False)() else "plain"
    if mode == "rich":
        return RichReporter()
    if mode == "json":
        return JsonReporter(stream)
    if mode == "quiet":
        return QuietReporter()
    return Reporter()


def as_reporter(log: Any = None) -> Reporter:
    """``None`` -> the automatic reporter; a Reporter -> itself; any callable -> lines to it."""
    if isinstance(log, Reporter):
        return log
    if log is None:
        return make_reporter("auto")
    return CallableReporter(log)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
