"""``ftcore prepare``: run the data pipeline alone and show what would be trained on."""

from __future__ import annotations

import json

import click

from ftcore.cli.options import echo_err, run_flags, user_errors


@click.command("prepare")
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--plugins", "-p", help="Comma-separated plugin names, e.g. lora,chatml.")
@click.option("--model", "-m", help="Base model folder or Hub id (only its tokenizer is loaded).")
@click.option("--data", "-d", multiple=True, help="Training data file, glob or folder (repeatable).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--show", "show", default=0, type=click.IntRange(min=0),
              help="Print N training examples with supervised tokens highlighted.")
@click.option("--color/--no-color", default=None,
              help="Colour supervised tokens (default: when printing to a terminal; else [[markers]]).")
@click.option("--json", "as_json", is_flag=True, help="Print counts and examples as JSON.")
@user_errors
def prepare_command(config_file: str | None, plugins: str | None, model: str | None, data: tuple[str, ...],
                    sets: tuple[str, ...], show: int, color: bool | None, as_json: bool) -> None:
    """Validate, format and tokenize the data, print counts, and show examples (no model is loaded).

    Supervised tokens (what the loss is computed on) are shown in bold green in a
    terminal, and between [[ and ]] otherwise; everything else is masked.
    """
    from rich.console import Console

    from ftcore.data.audit import audit_lines
    from ftcore.data.show import render_marked, render_rich
    from ftcore.tools.prepare import prepare_data, summary_lines

    flags = run_flags(plugins, model, data, None, sets, False)
    report = prepare_data(config_file, flags=flags, log=echo_err)
    examples = report.examples(show)
    if as_json:
        shown_problems = [str(p) for p in report.data.problems[: report.config.data.max_errors_shown]]
        click.echo(json.dumps({"stats": report.stats.as_dict(), "added_tokens": report.added_tokens,
                               "problems": shown_problems,
                               "examples": [render_marked(i, lab, report.tokenizer) for i, lab in examples]},
                              indent=2))
        return
    console = Console(highlight=False, soft_wrap=True, force_terminal=color, no_color=color is False)
    for line in summary_lines(report):
        console.print(line, markup=False)
    for k, line in enumerate(audit_lines(report.stats.audit)):
        console.print(line, markup=False, style="bold" if k == 0 else None)
    use_color = console.is_terminal and not console.no_color
    for title, ids, labels in report.shown(show):
        marked = "scored" if "," in title else "supervised"   # a preference answer is scored, not imitated
        legend = f"{marked} in bold green, masked dim" if use_color else f"{marked} tokens in [[...]]"
        console.print(f"\n--- {title} ({len(ids)} tokens, {sum(1 for t in labels if t != -100)} {marked}; "
                      f"{legend}) ---", markup=False)
        console.print(render_rich(ids, labels, report.tokenizer) if use_color
                      else render_marked(ids, labels, report.tokenizer), markup=False)
