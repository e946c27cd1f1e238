"""The ``ftcore`` command: a thin skin over the library (parse, call, print)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from ftcore import errors


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as a message (no traceback) and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.FtcoreError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ftcore")
def main() -> None:
    """ftcore: fine-tune open LLMs with LoRA, QLoRA or full fine-tuning, through plugins."""


def run_flags(plugins: str | None, model: str | None, data: tuple[str, ...], output: str | None,
              sets: tuple[str, ...], overwrite: bool) -> dict[str, Any]:
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
@click.option("--dry-run", is_flag=True, help="Validate, print the resolved config and plugins, and exit.")
@user_errors
def run(config_file: str | None, plugins: str | None, model: str | None, data: tuple[str, ...],
        output: str | None, sets: tuple[str, ...], overwrite: bool, dry_run: bool) -> None:
    """Fine-tune a model. CONFIG_FILE is an optional YAML file; flags override it."""
    import yaml

    from ftcore import engine

    flags = run_flags(plugins, model, data, output, sets, overwrite)
    config, chosen = engine.resolve(config_file, flags, log=_log)
    if dry_run:
        click.echo("# plugins")
        for row in chosen.versions():
            click.echo(f"#   {row['name']:<18} {row['kind']:<10} {row['distribution'] or '-'} {row['version'] or ''}")
        click.echo(yaml.safe_dump(config.to_dict(), sort_keys=False), nl=False)
        return
    engine.execute(config, chosen, _log)


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


from ftcore.merge import merge_command  # noqa: E402  (command in its own module)
main.add_command(merge_command)
from ftcore.estimate import estimate_command  # noqa: E402  (command in its own module)
main.add_command(estimate_command)

if __name__ == "__main__":  # pragma: no cover
    main()
