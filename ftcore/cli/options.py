"""What every command shares: the mapping of outcomes to exit statuses, and option groups."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from ftcore import errors
from ftcore.config.layering import deep_merge, parse_set
from ftcore.reporting.progress import make_reporter


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map outcomes to exit statuses (docs/reference/exit-codes.md).

    A user error prints its message, no traceback, status 2; an interrupted run 3; a
    plugin's or ftcore's own bug prints the traceback and exits 1.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.FtcoreError as exc:
            if exc.exit_code == errors.EXIT_INTERNAL:
                traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except errors.Stopped as exc:
            click.echo(f"stopped: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("stopped (no checkpoint saved)", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception:
            traceback.print_exc(file=sys.stderr)
            click.echo("internal error: this is a bug in ftcore or a library it uses; please report it with the "
                       "traceback above.", err=True)
            sys.exit(errors.EXIT_INTERNAL)

    return wrapper


def echo_err(message: str) -> None:
    """A log line for the user, on stderr (stdout stays for results: paths, JSON)."""
    click.echo(message, err=True)


def plugin_names(text: str | None) -> list[str]:
    """``"lora, chatml"`` -> ``["lora", "chatml"]``."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def run_flags(plugins: str | None, model: str | None, data: tuple[str, ...], output: str | None,
              sets: tuple[str, ...], overwrite: bool, resume: str | None = None) -> dict[str, Any]:
    """Command-line flags as a config layer (the top one)."""
    flags: dict[str, Any] = {}
    if plugins is not None:
        flags["plugins"] = plugin_names(plugins)
    if model:
        flags["model"] = {"path": model}
    if data:
        flags["data"] = {"datasets": [{"path": d} for d in data]}
    if output:
        flags["output_dir"] = output
    if overwrite:
        flags["overwrite"] = True
    if resume:
        flags["resume"] = resume
    return deep_merge(flags, parse_set(sets))


def choose_mode(no_progress: bool = False, quiet: bool = False, log_format: str = "text") -> str:
    """The reporter mode the display flags ask for."""
    if log_format == "json":
        return "json"
    if quiet:
        return "quiet"
    return "plain" if no_progress else "auto"


def progress_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--no-progress``, ``--quiet`` and ``--log-format`` to a click command; it receives ``reporter``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, no_progress: bool, quiet: bool, log_format: str, **kwargs: Any) -> Any:
        return fn(*args, reporter=make_reporter(choose_mode(no_progress, quiet, log_format)), **kwargs)

    for option in reversed([
        click.option("--no-progress", is_flag=True, help="Plain line logs instead of the live display."),
        click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors."),
        click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                     help="json: one JSON object per event on stdout, for machines."),
    ]):
        wrapper = option(wrapper)
    return wrapper


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of the commands that try a model (``generate``, ``chat``)."""
    options = [
        click.option("--model", "-m", required=True, help="Base or merged model folder or Hub id "
                     "(org/name[@revision]), an adapter folder, or a run's output directory."),
        click.option("--adapter", "-a", help="Adapter folder to apply on top of --model."),
        click.option("--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(1)),
        click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(0),
                     help="0: greedy (deterministic)."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1)),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"])),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn
