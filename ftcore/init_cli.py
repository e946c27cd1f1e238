"""``ftcore init``: write a commented starter config from a template (ftcore/templates/*.yaml)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

from ftcore.errors import ConfigError

TEMPLATES = {
    "lora-alpaca": "LoRA on Alpaca-style instruction data (one GPU or CPU).",
    "qlora-chatml": "QLoRA (4-bit base) on chat conversations: a 7B model on one 24 GB GPU.",
    "deepspeed": "LoRA on several GPUs or machines with DeepSpeed ZeRO.",
}
MODEL_PLACEHOLDER = "path/to/your-model"
DATA_PLACEHOLDER = "path/to/train.jsonl"


def template_text(name: str) -> str:
    """The raw template (with ``{model}``, ``{data}`` and ``{filename}`` fields)."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}.")
    return resources.files("ftcore").joinpath(f"templates/{name}.yaml").read_text(encoding="utf-8")


def render(name: str, model: str | None = None, data: str | None = None, filename: str = "ftcore.yaml") -> str:
    return template_text(name).format(model=model or MODEL_PLACEHOLDER, data=data or DATA_PLACEHOLDER,
                                      filename=filename)


def write_config(path: str | Path, name: str = "lora-alpaca", model: str | None = None, data: str | None = None,
                 force: bool = False) -> Path:
    """Write the starter config; an existing file is kept unless ``force``."""
    target = Path(path)
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; choose another path or pass --force to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(name, model, data, target.name), encoding="utf-8")
    return target


@click.command("init")
@click.argument("path", default="ftcore.yaml", type=click.Path(dir_okay=False))
@click.option("--template", "-t", "template", type=click.Choice(list(TEMPLATES)), default="lora-alpaca",
              show_default=True, help="Which starter config to write.")
@click.option("--model", "-m", help="Fill in the model folder.")
@click.option("--data", "-d", help="Fill in the training data file.")
@click.option("--force", is_flag=True, help="Replace PATH if it exists.")
@click.option("--list", "list_templates", is_flag=True, help="List the templates and exit.")
def init_cmd(path: str, template: str, model: str | None, data: str | None, force: bool,
             list_templates: bool) -> None:
    """Write a commented starter config to PATH (default ftcore.yaml)."""
    from ftcore.cli import user_errors

    if list_templates:
        for name, text in TEMPLATES.items():
            click.echo(f"{name:<14} {text}")
        return

    @user_errors
    def body() -> None:
        target = write_config(path, template, model, data, force)
        todo = [k for k, v in (("model", model), ("data", data)) if not v]
        click.echo(f"wrote {target} ({template}: {TEMPLATES[template]})", err=True)
        if todo:
            click.echo(f"next: fill in {' and '.join(todo)} in {target} (marked FILL IN), then "
                       f"`ftcore run {target} --dry-run` to check it and `ftcore run {target}` to train.", err=True)
        else:
            click.echo(f"next: `ftcore run {target} --dry-run` to check it, `ftcore run {target}` to train.", err=True)

    body()
