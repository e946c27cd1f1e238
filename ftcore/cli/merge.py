"""``ftcore merge``: merge a trained adapter into its base model (safetensors + tokenizer)."""

from __future__ import annotations

import click

from ftcore.cli.options import echo_err, plugin_names, user_errors
from ftcore.tools.adapter_merge import DTYPES


@click.command("merge")
@click.option("--adapter", "-a", "adapter", required=True, help="Adapter folder (a run's output/adapter).")
@click.option("--output", "-o", required=True, help="Folder to write the merged model to (must not exist).")
@click.option("--base", "-b", help="Base model folder, Hub id or ftcore:tiny-llama; default: the one the adapter "
              "names.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Weights dtype of the merged model; auto: the base's saved dtype. Never 4-bit.")
@click.option("--plugins", "-p", help="Adapter plugin that trained the adapter; default: from the run's plugins.json.")
@user_errors
def merge_command(adapter: str, output: str, base: str | None, dtype: str, plugins: str | None) -> None:
    """Merge a trained adapter into its base model (safetensors + tokenizer)."""
    from ftcore.quiet import quiet_libraries
    from ftcore.tools.adapter_merge import merge_adapter

    quiet_libraries()
    out = merge_adapter(adapter, output, base=base, dtype=dtype, plugins=plugin_names(plugins) or None, log=echo_err)
    click.echo(str(out))
