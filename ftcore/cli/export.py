"""``ftcore export``: run exporter plugins on a finished run (or a model folder)."""

from __future__ import annotations

import click

from ftcore.cli.options import echo_err, plugin_names, user_errors
from ftcore.config.layering import parse_set


@click.command("export")
@click.option("--plugins", "-p", required=True, help="Exporter plugins, comma-separated, e.g. gguf-export.")
@click.option("--model", "-m", required=True,
              help="A run folder, its adapter/ or model/ folder, or a transformers model folder.")
@click.option("--output", "-o", help="The file (or folder) to write; default: where the exporter writes in a run.")
@click.option("--base", help="Base model of an adapter (default: the run's model, else adapter_config.json).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Set an exporter option (repeatable): --set gguf-export.quant=q4_0")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--strict-exports", "--strict-parity", "strict", is_flag=True,
              help="An exporter whose check of its output fails (gguf-export's parity) is an error, not a warning.")
@user_errors
def export_command(plugins: str, model: str, output: str | None, base: str | None, sets: tuple[str, ...],
                   overwrite: bool, strict: bool) -> None:
    """Export a model (merging an adapter first) through exporter plugins; print the paths written."""
    from ftcore.quiet import quiet_libraries
    from ftcore.tools.export import export

    quiet_libraries()
    for path in export(model, output, plugin_names(plugins), base=base, sets=parse_set(sets),
                       overwrite=overwrite, strict=strict, log=echo_err):
        click.echo(str(path))
