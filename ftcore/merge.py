"""Merge a trained adapter into its base model and save a plain transformers model.

The core does not know how an adapter is made: it asks the adapter plugin that trained
it, through the ``ftcore_merge_adapter`` hook, for the merged model, then saves that
model (safetensors) with the tokenizer. Which plugin: ``--plugins``, else the run's
``plugins.json`` found next to (or above) the adapter folder.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ftcore.errors import ConfigError, PluginError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PROVENANCE = "ftcore-merge.json"


def run_plugins_for(adapter_dir: Path) -> list[str]:
    """Adapter plugins listed in the plugins.json of the ftcore run that holds this folder."""
    for folder in [adapter_dir, *list(adapter_dir.resolve().parents)[:3]]:
        listing = folder / "plugins.json"
        if listing.is_file():
            try:
                rows = json.loads(listing.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return []
            return [r["name"] for r in rows if isinstance(r, dict) and r.get("kind") == "adapter"]
    return []


def merge_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, base: str | None = None,
                  dtype: str = "auto", plugins: list[str] | None = None, plugin_set: Any = None,
                  ctx: Any = None, log: Callable[[str], None] = print) -> Path:
    """Write ``base + adapter`` merged into ``output_dir``; return that folder.

    ``plugins`` names the adapter plugin(s) to ask; ``plugin_set`` (a run's PluginSet) is
    used as is instead. Nothing already at ``output_dir`` is overwritten.
    """
    from ftcore.models import BUILTIN_PREFIX, resolve_model_path
    from ftcore.plugins import select

    adapter = Path(adapter_dir)
    out = Path(output_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    if not adapter.is_dir():
        raise ConfigError(f"adapter folder {adapter} does not exist. Pass --adapter with a run's adapter folder "
                          f"(e.g. runs/my-run/adapter).")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} already exists and is not empty; nothing is overwritten. "
                          f"Choose another --output or remove it.")
    if base and not base.startswith(BUILTIN_PREFIX) and not (Path(base) / "config.json").is_file():
        raise ConfigError(f"base model {base} (--base) is not a model folder: no config.json there. Pass --base "
                          f"with the folder of the model the adapter was trained on.")
    base_path = str(resolve_model_path(base, log)) if base else None
    if plugin_set is None:
        names = plugins or run_plugins_for(adapter)
        if not names:
            raise PluginError(f"cannot tell which plugin trained the adapter in {adapter}: no ftcore run's "
                              f"plugins.json next to it. Pass --plugins with the adapter plugin that trained it "
                              f"(`ftcore plugins` lists the adapter plugins).")
        plugin_set = select(names)
    tried = plugin_set.names("adapter") or plugin_set.names()
    model = plugin_set.hook.ftcore_merge_adapter(adapter_dir=str(adapter), base_path=base_path, dtype=dtype,
                                                 ctx=ctx)
    if model is None:
        raise ConfigError(f"{adapter} is not an adapter that the plugin(s) {', '.join(tried)} can merge "
                          f"(no adapter files they recognise there).")
    log(f"merged the adapter in {adapter} into {model.name_or_path}; saving to {out}")
    save_merged(model, tokenizer_for(adapter, model), out, {
        "adapter": str(adapter.resolve()), "base": str(model.name_or_path), "dtype": str(model.dtype),
        "plugins": tried})
    return out


def tokenizer_for(adapter: Path, model: Any) -> Any:
    """The run saves its tokenizer (with any tokens a format added) next to the adapter; else the base's."""
    from transformers import AutoTokenizer

    source = adapter if (adapter / "tokenizer_config.json").is_file() else Path(model.name_or_path)
    return AutoTokenizer.from_pretrained(str(source))


def save_merged(model: Any, tokenizer: Any, out: Path, provenance: dict[str, Any]) -> None:
    """Save aside, then rename: an interrupted merge never leaves a half-written model at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        out.rmdir()   # empty (checked before merging)
    os.replace(tmp, out)


def _cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The CLI's user-error handling, looked up at call time (no import cycle with ftcore.cli)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ftcore.cli import user_errors

        return user_errors(fn)(*args, **kwargs)

    return wrapper


@click.command("merge")
@click.option("--adapter", "-a", "adapter", required=True, help="Adapter folder (a run's output/adapter).")
@click.option("--output", "-o", required=True, help="Folder to write the merged model to (must not exist).")
@click.option("--base", "-b", help="Base model folder (or ftcore:tiny-llama); default: the one the adapter names.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Weights dtype of the merged model; auto: the base's saved dtype. Never 4-bit.")
@click.option("--plugins", "-p", help="Adapter plugin that trained the adapter; default: from the run's plugins.json.")
@_cli_errors
def merge_command(adapter: str, output: str, base: str | None, dtype: str, plugins: str | None) -> None:
    """Merge a trained adapter into its base model (safetensors + tokenizer)."""
    from ftcore._quiet import quiet_libraries

    quiet_libraries()
    names = [p.strip() for p in plugins.split(",") if p.strip()] if plugins else None
    out = merge_adapter(adapter, output, base=base, dtype=dtype, plugins=names,
                        log=lambda m: click.echo(m, err=True))
    click.echo(str(out))
