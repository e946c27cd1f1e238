"""``ftcore chat``: talk to a model through its chat template, one message per line."""

from __future__ import annotations

import sys

import click

from ftcore.cli.options import model_options, user_errors


@click.command("chat")
@model_options
@click.option("--system", "-s", help="A system message that starts the conversation.")
@user_errors
def chat_command(model: str, adapter: str | None, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, dtype: str, system: str | None) -> None:
    """Talk to a model with its chat template. One message per line; /reset starts over, /exit or Ctrl-D ends."""
    from transformers import set_seed

    from ftcore.models.generation import ChatSession
    from ftcore.tools.generate import load

    set_seed(seed)
    net, tok = load(model, adapter, dtype)
    session = ChatSession(net, tok, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo("ftcore chat: one message per line; /reset starts over, /exit or Ctrl-D ends.", err=True)
    try:
        converse(session, interactive)
    except KeyboardInterrupt:
        click.echo("", err=True)


def converse(session: object, interactive: bool) -> None:
    while True:
        if interactive:
            click.echo(click.style("you> ", bold=True), nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
            continue
        answer = session.reply(message)
        click.echo((click.style("model> ", bold=True) if interactive else "") + answer)
