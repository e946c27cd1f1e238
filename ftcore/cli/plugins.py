"""``ftcore plugins``: the installed plugins, their kinds, packages and versions, and import errors."""

from __future__ import annotations

import json

import click

from ftcore.registry.discovery import describe_installed


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_command(as_json: bool) -> None:
    """List installed plugins: name, kind, package, version, description (and import errors)."""
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
