"""The ``ftcore`` command: a thin skin over the library (parse, call, print)."""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from ftcore import errors
from ftcore.progress import progress_options


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ftcore")
def main() -> None:
    """ftcore: fine-tune open LLMs with LoRA, QLoRA or full fine-tuning, through plugins."""
    from ftcore._quiet import quiet_loggers

    quiet_loggers()   # before any command imports a library that warns on import


def run_flags(plugins: str | None, model: str | None, data: tuple[str, ...], output: str | None,
              sets: tuple[str, ...], overwrite: bool, resume: str | None = None) -> dict[str, Any]:
    """CLI flags as a config layer (the top one)."""
    from ftcore.config import merge, parse_set

    flags: dict[str, Any] = {}
    if plugins is not None:
        flags["plugins"] = [p.strip() for p in plugins.split(",") if p.strip()]
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
    return merge(flags, parse_set(sets))


@main.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--plugins", "-p", help="Comma-separated plugin names, e.g. qlora,chatml.")
@click.option("--model", "-m", help="Base model folder (or ftcore:tiny-llama).")
@click.option("--data", "-d", multiple=True, help="Training data file, glob or folder (repeatable).")
@click.option("--output", "-o", help="Output directory.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, dotted for sections (repeatable): --set lora.r=8")
@click.option("--overwrite", is_flag=True, help="Replace an output directory holding a previous run.")
@click.option("--resume", metavar="auto|PATH",
              help="Continue from the newest complete checkpoint in the output directory (auto), "
                   "or from a given checkpoint-N or run folder.")
@click.option("--dry-run", is_flag=True, help="Validate, print the resolved config and plugins, and exit.")
@click.option("--num-processes", type=int, help="Processes (ranks) in all, over all machines (launch.num_processes).")
@click.option("--num-machines", type=int, help="Machines taking part (launch.num_machines).")
@click.option("--machine-rank", type=int, help="This machine's index; 0 writes the outputs (launch.machine_rank).")
@click.option("--main-process-ip", help="Address of machine 0 (launch.main_process_ip).")
@click.option("--main-process-port", type=int, help="Rendezvous port on machine 0 (launch.main_process_port).")
@click.option("--hostfile", type=click.Path(dir_okay=False), help="Hostfile starting every machine (launch.hostfile).")
@progress_options
@user_errors
def run(config_file: str | None, plugins: str | None, model: str | None, data: tuple[str, ...],
        output: str | None, sets: tuple[str, ...], overwrite: bool, resume: str | None, dry_run: bool,
        reporter: Any, **launch: Any) -> None:
    """Fine-tune a model. CONFIG_FILE is an optional YAML file; flags override it.

    Exit status: 0 done, 1 internal error, 2 user error, 3 interrupted with a checkpoint saved.
    """
    import yaml

    from ftcore import engine
    from ftcore.config import merge

    with reporter:
        flags = run_flags(plugins, model, data, output, sets, overwrite, resume)
        given = {k: v for k, v in launch.items() if v is not None}
        flags = merge(flags, {"launch": given}) if given else flags
        config, chosen = engine.resolve(config_file, flags, log=reporter)
        if dry_run and reporter.mode == "json":
            reporter.emit("dry_run", plugins=chosen.versions(), config=config.to_dict())
            return
        if dry_run:
            click.echo("# plugins")
            for row in chosen.versions():
                click.echo(f"#   {row['name']:<18} {row['kind']:<10} {row['distribution'] or '-'} {row['version'] or ''}")
            click.echo(yaml.safe_dump(config.to_dict(), sort_keys=False), nl=False)
            return
        result = engine.execute(config, chosen, reporter)
    engine.leave_process_group()
    engine.end_worker_rank(result.exit_code)
    if result.exit_code:
        sys.exit(result.exit_code)


def _log(message: str) -> None:
    click.echo(message, err=True)


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_cmd(as_json: bool) -> None:
    """List installed plugins: name, kind, package, version, description (and import errors)."""
    from ftcore.plugins import describe_installed

    rows = describe_installed()
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ftcore plugins")
    for col in ("name", "kind", "package", "version", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        desc = r.description if r.error is None else f"[red]failed to import: {r.error}[/red]"
        table.add_row(r.name, r.kind or "?", r.distribution or "-", r.version or "-", desc)
    Console(width=max(120, Console().width)).print(table)


from ftcore.prepare_cli import prepare_cmd  # noqa: E402  (a command in its own module)
main.add_command(prepare_cmd)

from ftcore.merge import merge_command  # noqa: E402  (command in its own module)
main.add_command(merge_command)
from ftcore.export import command as export_command  # noqa: E402

main.add_command(export_command)
from ftcore.generate import chat_cmd, generate_cmd  # noqa: E402
from ftcore.init_cli import init_cmd  # noqa: E402

main.add_command(generate_cmd)
main.add_command(chat_cmd)
main.add_command(init_cmd)

from ftcore.estimate import estimate_command  # noqa: E402  (command in its own module)
main.add_command(estimate_command)

if __name__ == "__main__":  # pragma: no cover
    main()
