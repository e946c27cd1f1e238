"""``ftcore init``: write a commented starter config from a template."""

from __future__ import annotations

import click

from ftcore.cli.options import user_errors
from ftcore.tools.templates import TEMPLATES, write_config


@click.command("init")
@click.argument("path", default="ftcore.yaml", type=click.Path(dir_okay=False))
@click.option("--template", "-t", "template", type=click.Choice(list(TEMPLATES)), default="lora-alpaca",
              show_default=True, help="Which starter config to write.")
@click.option("--model", "-m", help="Fill in the model folder.")
@click.option("--data", "-d", help="Fill in the training data file.")
@click.option("--force", is_flag=True, help="Replace PATH if it exists.")
@click.option("--list", "list_templates", is_flag=True, help="List the templates and exit.")
@user_errors
def init_command(path: str, template: str, model: str | None, data: str | None, force: bool,
                 list_templates: bool) -> None:
    """Write a commented starter config to PATH (default ftcore.yaml)."""
    if list_templates:
        for name, text in TEMPLATES.items():
            click.echo(f"{name:<14} {text}")
        return
    target = write_config(path, template, model, data, force)
    todo = [k for k, v in (("model", model), ("data", data)) if not v]
    click.echo(f"wrote {target} ({template}: {TEMPLATES[template]})", err=True)
    if todo:
        click.echo(f"next: fill in {' and '.join(todo)} in {target} (marked FILL IN), then "
                   f"`ftcore run {target} --dry-run` to check it and `ftcore run {target}` to train.", err=True)
    else:
        click.echo(f"next: `ftcore run {target} --dry-run` to check it, `ftcore run {target}` to train.", err=True)
