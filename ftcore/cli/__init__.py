"""The ``ftcore`` command: a thin skin over the library, one module per command (parse, call, print).

Only this package uses click; every command is a library call an application can make itself.
"""

from __future__ import annotations

import click

from ftcore.cli.chat import chat_command
from ftcore.cli.estimate import estimate_command
from ftcore.cli.export import export_command
from ftcore.cli.generate import generate_command
from ftcore.cli.init import init_command
from ftcore.cli.merge import merge_command
from ftcore.cli.plugins import plugins_command
from ftcore.cli.prepare import prepare_command
from ftcore.cli.run import run_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ftcore")
def main() -> None:
    """ftcore: fine-tune open LLMs with LoRA, QLoRA or full fine-tuning, through plugins."""
    from ftcore.quiet import quiet_loggers

    quiet_loggers()   # before any command imports a library that warns on import


for _command in (run_command, prepare_command, plugins_command, merge_command, export_command, estimate_command,
                 generate_command, chat_command, init_command):
    main.add_command(_command)
