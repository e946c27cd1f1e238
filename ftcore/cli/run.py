"""``ftcore run``: fine-tune a model (``ftcore.run`` from the command line)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ftcore.cli.options import progress_options, run_flags, user_errors
from ftcore.config.layering import deep_merge


@click.command("run")
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--plugins", "-p", help="Comma-separated plugin names, e.g. qlora,chatml.")
@click.option("--model", "-m", help="Base model: a folder, a Hub id (org/name[@revision]) or ftcore:tiny-llama.")
@click.option("--data", "-d", multiple=True, help="Training data file, glob or folder (repeatable).")
@click.option("--output", "-o", help="Output directory.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, dotted for sections (repeatable): --set lora.r=8")
@click.option("--overwrite", is_flag=True, help="Replace an output directory holding a previous run.")
@click.option("--resume", metavar="auto|PATH",
              help="Continue from the newest complete checkpoint in the output directory (auto), "
                   "or from a given checkpoint-N or run folder.")
@click.option("--strict-exports", "--strict-parity", "strict_exports", is_flag=True,
              help="An exporter whose check of its output fails (gguf-export's parity) is an error, not a warning.")
@click.option("--dry-run", is_flag=True, help="Validate, print the resolved config and plugins, and exit.")
@click.option("--num-processes", type=int, help="Processes (ranks) in all, over all machines (launch.num_processes).")
@click.option("--num-machines", type=int, help="Machines taking part (launch.num_machines).")
@click.option("--machine-rank", type=int, help="This machine's index; 0 writes the outputs (launch.machine_rank).")
@click.option("--main-process-ip", help="Address of machine 0 (launch.main_process_ip).")
@click.option("--main-process-port", type=int, help="Rendezvous port on machine 0 (launch.main_process_port).")
@click.option("--hostfile", type=click.Path(dir_okay=False), help="Hostfile starting every machine (launch.hostfile).")
@progress_options
@user_errors
def run_command(config_file: str | None, plugins: str | None, model: str | None, data: tuple[str, ...],
                output: str | None, sets: tuple[str, ...], overwrite: bool, resume: str | None,
                strict_exports: bool, dry_run: bool, reporter: Any, **launch: Any) -> None:
    """Fine-tune a model. CONFIG_FILE is an optional YAML file; flags override it.

    Exit status: 0 done, 1 internal error, 2 user error, 3 interrupted with a checkpoint saved.
    """
    import yaml

    from ftcore.registry.resolution import resolve
    from ftcore.training import processes
    from ftcore.training.engine import execute

    with reporter:
        flags = run_flags(plugins, model, data, output, sets, overwrite, resume)
        if strict_exports:
            flags["strict_exports"] = True
        given = {k: v for k, v in launch.items() if v is not None}
        flags = deep_merge(flags, {"launch": given}) if given else flags
        config, chosen = resolve(config_file, flags, log=reporter)
        if dry_run and reporter.mode == "json":
            reporter.emit("dry_run", plugins=chosen.versions(), config=config.to_dict())
            return
        if dry_run:
            click.echo("# plugins")
            for row in chosen.versions():
                click.echo(f"#   {row['name']:<18} {row['kind']:<10} {row['distribution'] or '-'} {row['version'] or ''}")
            click.echo(yaml.safe_dump(config.to_dict(), sort_keys=False), nl=False)
            return
        result = execute(config, chosen, reporter)
    processes.leave_process_group()
    processes.end_worker_rank(result.exit_code)
    if result.exit_code:
        sys.exit(result.exit_code)
