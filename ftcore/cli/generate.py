"""``ftcore generate``: one completion from a base, adapter or merged model."""

from __future__ import annotations

import re
import sys

import click

from ftcore.cli.options import model_options, user_errors
from ftcore.errors import ConfigError


@click.command("generate")
@model_options
@click.option("--chat-template", "use_template", is_flag=True,
              help="Wrap the prompt as one user message with the tokenizer's chat template.")
@click.option("--escape/--no-escape", default=True, show_default=True,
              help="Read \\n, \\t and \\\\ in a PROMPT argument as a newline, a tab and a backslash "
                   "(as llama.cpp's llama-cli does); a prompt on stdin is taken as it is.")
@click.argument("prompt", required=False)
@user_errors
def generate_command(model: str, adapter: str | None, max_new_tokens: int, temperature: float, top_p: float,
                     seed: int, dtype: str, use_template: bool, escape: bool, prompt: str | None) -> None:
    """Print the model's continuation of PROMPT (read from stdin when PROMPT is - or missing)."""
    from transformers import set_seed

    from ftcore.models.generation import ChatSession, complete
    from ftcore.tools.generate import load

    text = (unescape(prompt) if escape else prompt) if prompt not in (None, "-") else sys.stdin.read()
    if not text.strip():
        raise ConfigError("no prompt: pass it as an argument or on stdin.")
    set_seed(seed)
    net, tok = load(model, adapter, dtype)
    if use_template:
        session = ChatSession(net, tok, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        click.echo(session.reply(text.strip()))
    else:
        click.echo(complete(net, tok, text, max_new_tokens, temperature=temperature, top_p=top_p))


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` typed in a shell argument as the characters they name; other backslashes stay."""
    return re.sub(r"\\([nt\\])", lambda m: ESCAPES[m.group(1)], text)
