"""``ftcore estimate``: the memory a fine-tune needs, per adapter method, from the model's config alone."""

from __future__ import annotations

import json
from typing import Any

import click

from ftcore.cli.options import echo_err, plugin_names, user_errors
from ftcore.config.layering import parse_set
from ftcore.tools.estimate import BYTES, DEVICES, GB


def _gb(n: int) -> str:
    return f"{n / GB:,.2f}"


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{result['model']}: {result['params'] / 1e9:.2f}B params, batch {result['batch']} x seq "
             f"{result['seq_len']}, {result['precision']}, {result['optimizer']}, gradient checkpointing "
             f"{'on' if result['gradient_checkpointing'] else 'off'}, {result['device']}, {result['loss']['path']} "
             f"loss" + (f", per process of {result['processes']} ({result['sharding']})" if result.get("sharding")
                        else ""))
    marked = len(result["selected"]) < len(result["methods"])
    table = Table(title=title, caption="* the method named with --plugins" if marked else None)
    for col in ("method", "weights GB", "gradients GB", "optimizer GB", "activations GB",
                "overhead GB", "total GB", "trainable"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in result["methods"]:
        name = r["method"] + (" (ckpt)" if r["gradient_checkpointing"] and not result["gradient_checkpointing"] else "")
        if marked and r["selected"]:
            name = f"[bold]* {name}[/bold]"
        table.add_row(name, _gb(r["weights"]), _gb(r["gradients"]), _gb(r["optimizer"]), _gb(r["activations"]),
                      _gb(r["overhead"]),
                      f"[bold]{_gb(r['total'])}[/bold]", f"{r['trainable_params']:,d}")
    console = Console(width=max(110, Console().width))
    console.print(table)
    for note in result.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    console.print("Assumptions:")
    for line in result["assumptions"]:
        console.print(f"  - {line}", highlight=False)


@click.command("estimate")
@click.option("--model", "-m", required=True, help="Model folder, its config.json, a Hub id (org/name[@revision]: "
              "its config.json alone is fetched), or ftcore:tiny-llama (no weights are read).")
@click.option("--plugins", "-p", default="", help="The run's plugins: every installed adapter method is shown side "
              "by side and the one named here is marked; an optimizer plugin named here sets the optimizer state; "
              "other plugins do not change the estimate.")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per sequence.")
@click.option("--batch", default=4, show_default=True, help="Sequences per device per step (training.batch_size).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True,
              help="As training.gradient_checkpointing (a method may always checkpoint).")
@click.option("--precision", type=click.Choice(sorted(BYTES)), default="bf16", show_default=True,
              help="Training precision of the target machine (fp32 on a CPU).")
@click.option("--device", type=click.Choice(DEVICES), default="cuda", show_default=True,
              help="The target device, for the framework's overhead per process: on cuda the CUDA context and the "
                   "allocator's fragmentation, on cpu the training loop's own heap memory.")
@click.option("--supervised-share", default=1.0, show_default=True, type=float,
              help="Share of tokens whose next token is supervised: with training.sparse_logits (on by default) only "
                   "they get logits. 1.0 is the worst case (every token, as for pretraining-style data).")
@click.option("--num-processes", "processes", type=int, default=None,
              help="Processes the run uses (launch.num_processes): with a sharding strategy in --plugins (fsdp) "
                   "the figures are per process.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key as for ftcore run, dotted for sections (repeatable): a plugin's own "
                   "settings, e.g. --set lora.r=8")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (bytes) instead of a table.")
@user_errors
def estimate_command(model: str, plugins: str, seq_len: int, batch: int, gradient_checkpointing: bool,
                     precision: str, device: str, supervised_share: float, processes: int | None,
                     sets: tuple[str, ...], as_json: bool) -> None:
    """Estimate the memory a fine-tune needs, for every installed adapter method, from the model's config alone."""
    from ftcore.quiet import quiet_libraries
    from ftcore.tools.estimate import estimate

    quiet_libraries()
    # building the builtin model (once) is logged to stderr: stdout may be --json
    result = estimate(model, plugin_names(plugins), seq_len, batch, gradient_checkpointing, precision,
                      settings=parse_set(sets), log=echo_err, device=device, supervised_share=supervised_share,
                      processes=processes)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_table(result)
