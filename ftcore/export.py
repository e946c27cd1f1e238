"""``ftcore export``: turn a finished run's model (or any model folder) into artifacts through exporter plugins.

The command names no exporter: it selects the plugins given with --plugins, validates
their config sections, and calls hook ``ftcore_export`` exactly as a run does at its end.
When the model is an adapter, the adapter plugin that trained it (from the run's
plugins.json) is selected too, so exporters can merge it through ``ftcore_merge_adapter``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ftcore.errors import ConfigError, PluginError

OUTPUT_KEY = "export_output"   # ctx.state key exporters read for the requested output path


def export(model: str, output: str, plugins: list[str], *, base: str | None = None,
           sets: dict[str, Any] | None = None, overwrite: bool = False,
           log: Callable[[str], None] = print) -> list[Path]:
    """Export ``model`` (a run folder, its adapter/ or model/ folder, or a model folder) to ``output``."""
    import yaml

    from ftcore import config as cfg
    from ftcore import engine

    model_dir = _model_folder(Path(model))
    run_dir = model_dir.parent if (model_dir.parent / engine.RUN_MARKER).is_file() else None
    is_adapter = (model_dir / "adapter_config.json").is_file()
    names = list(plugins)
    run_config: dict[str, Any] = {}
    if run_dir is not None:
        saved = run_dir / "config.yaml"
        run_config = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
    if is_adapter:
        names += [n for n in _run_adapter_plugins(run_dir) if n not in names]
        base = base or (run_config.get("model") or {}).get("path") or _adapter_base(model_dir)
    flags: dict[str, Any] = {"plugins": names, "model": {"path": base or str(model_dir)},
                             "output_dir": str(run_dir or Path(output).parent), "overwrite": overwrite}
    config, chosen = engine.resolve(None, cfg.merge(flags, sets or {}), log=log)
    if not chosen.names("exporter"):
        raise PluginError(f"no exporter plugin among {', '.join(names) or '(none)'}: pass one with --plugins "
                          f"(`ftcore plugins` lists them with their kinds).")
    ctx = engine.RunContext(config=config, plugins=chosen, output_dir=Path(config.output_dir), log=log)
    ctx.state[OUTPUT_KEY] = output
    written: list[Path] = []
    for paths in chosen.hook.ftcore_export(run_dir=run_dir or model_dir, model_dir=model_dir,
                                           config=config, ctx=ctx):
        written += [Path(p) for p in paths or []]
    return written


def _model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise ConfigError(f"--model {path}: no such folder. Pass a run's output folder, its adapter/ or model/ "
                          f"folder, or a transformers model folder.")
    for sub in ("model", "adapter"):
        if not (path / "config.json").is_file() and (path / sub).is_dir():
            return path / sub
    return path


def _run_adapter_plugins(run_dir: Path | None) -> list[str]:
    """The adapter plugin a run used, from its plugins.json."""
    if run_dir is None or not (run_dir / "plugins.json").is_file():
        return []
    rows = json.loads((run_dir / "plugins.json").read_text())
    return [r["name"] for r in rows if r.get("kind") == "adapter"]


def _adapter_base(adapter_dir: Path) -> str:
    found = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not found:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base model: pass it with --base.")
    return found


@click.command("export")
@click.option("--plugins", "-p", required=True, help="Exporter plugins, comma-separated, e.g. gguf-export.")
@click.option("--model", "-m", required=True,
              help="A run folder, its adapter/ or model/ folder, or a transformers model folder.")
@click.option("--output", "-o", required=True, help="The file (or folder) to write.")
@click.option("--base", help="Base model of an adapter (default: the run's model, else adapter_config.json).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Set an exporter option (repeatable): --set gguf-export.quant=q4_0")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def command(plugins: str, model: str, output: str, base: str | None, sets: tuple[str, ...], overwrite: bool) -> None:
    """Export a model (merging an adapter first) through exporter plugins."""
    from ftcore.cli import _log, user_errors
    from ftcore.config import parse_set

    names = [p.strip() for p in plugins.split(",") if p.strip()]
    run = user_errors(lambda: export(model, output, names, base=base, sets=parse_set(sets),
                                     overwrite=overwrite, log=_log))
    for path in run():
        click.echo(str(path))
