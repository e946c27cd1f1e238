"""Merging a trained adapter into its base model and saving a plain transformers model.

The core does not know how an adapter is made: it asks the adapter plugin that trained it,
through the ``ftcore_merge_adapter`` hook, for the merged model, then saves that model
(safetensors) with the tokenizer. Which plugin: the names given, else the adapter plugin in
the plugins.json of the run that holds the adapter, else every installed plugin that merges.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftcore import runfolder
from ftcore.errors import ConfigError, PluginError
from ftcore.files import atomic_folder
from ftcore.models.builtin import BUILTIN_PREFIX
from ftcore.models.hub import parse_hub_id
from ftcore.models.loading import load_pretrained_tokenizer
from ftcore.models.paths import resolve_model_path
from ftcore.registry.discovery import hooks_of, installed_entry_points, load_entry_point
from ftcore.registry.pluginset import PluginSet
from ftcore.registry.selection import select

DTYPES = ("auto", "float32", "bfloat16", "float16")
PROVENANCE = "ftcore-merge.json"


def merging_plugins(adapter_dir: Path, names: list[str] | None = None, any_installed: bool = False) -> PluginSet:
    """The plugins to ask to merge ``adapter_dir``: ``names``, else the adapter plugin(s) of the run that
    holds it, else (``any_installed``) every installed plugin that implements ``ftcore_merge_adapter``."""
    if names:
        return select(names, defaults=False)
    run = runfolder.run_holding(adapter_dir)
    used = runfolder.plugins_used(run, "adapter") if run is not None else []
    installed = installed_entry_points()
    if not used and not any_installed:
        raise PluginError(f"cannot tell which plugin trained the adapter in {adapter_dir}: no ftcore run's "
                          f"plugins.json next to it. Pass --plugins with the adapter plugin that trained it "
                          f"(`ftcore plugins` lists the adapter plugins).")
    candidates = [n for n in used if n in installed] or list(installed)
    chosen = PluginSet()
    for name in candidates:
        try:
            obj = load_entry_point(name, installed[name])
        except PluginError:
            continue   # an unrelated broken plugin must not stop the merge
        if "ftcore_merge_adapter" in hooks_of(obj):
            chosen.add(name, obj)
    return chosen


def merged_model(adapter_dir: str | os.PathLike, base: str | None = None, dtype: str = "auto",
                 plugins: PluginSet | list[str] | None = None, ctx: Any = None, any_installed: bool = False) -> Any:
    """The base model with the adapter merged in (a plain transformers model), from the adapter's plugin.

    ``plugins``: a run's PluginSet, plugin names, or None (see ``merging_plugins``).
    """
    adapter = Path(adapter_dir)
    chosen = plugins if isinstance(plugins, PluginSet) else merging_plugins(adapter, plugins, any_installed)
    model = chosen.hook.ftcore_merge_adapter(adapter_dir=str(adapter), base_path=base, dtype=dtype, ctx=ctx)
    if model is None:
        tried = chosen.names("adapter") or chosen.names()
        raise ConfigError(f"{adapter} is not an adapter that the plugin(s) {', '.join(tried) or '(none)'} can "
                          f"merge (no adapter files they recognise there). Pass --plugins with the adapter "
                          f"plugin that trained it (`ftcore plugins` lists the adapter plugins).")
    return model


def merge_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, base: str | None = None,
                  dtype: str = "auto", plugins: PluginSet | list[str] | None = None, ctx: Any = None,
                  log: Callable[[str], None] = print, replace: bool = False) -> Path:
    """Write ``base + adapter`` merged into ``output_dir`` (safetensors and tokenizer); return that folder.

    ``plugins``: the plugins to ask (a run's PluginSet, or names); default: the adapter's run's
    adapter plugin. Nothing already at ``output_dir`` is overwritten unless ``replace``.
    """
    adapter = Path(adapter_dir)
    out = Path(output_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    if not adapter.is_dir():
        raise ConfigError(f"adapter folder {adapter} does not exist. Pass --adapter with a run's adapter folder "
                          f"(e.g. runs/my-run/adapter).")
    if out.exists() and not replace and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} already exists and is not empty; nothing is overwritten. "
                          f"Choose another --output or remove it.")
    if base and not base.startswith(BUILTIN_PREFIX) and parse_hub_id(base) is None \
            and not (Path(base) / "config.json").is_file():
        raise ConfigError(f"base model {base} (--base) is not a model folder: no config.json there. Pass --base "
                          f"with the folder (or Hub id) of the model the adapter was trained on.")
    base_path = str(resolve_model_path(base, log)) if base else None
    chosen = plugins if isinstance(plugins, PluginSet) else merging_plugins(adapter, plugins)
    model = merged_model(adapter, base_path, dtype, chosen, ctx)
    log(f"merged the adapter in {adapter} into {model.name_or_path}; saving to {out}")
    save_merged(model, tokenizer_for(adapter, model), out, {
        "adapter": str(adapter.resolve()), "base": str(model.name_or_path), "dtype": str(model.dtype),
        "plugins": chosen.names("adapter") or chosen.names()}, replace=replace)
    return out


def tokenizer_for(adapter: Path, model: Any) -> Any:
    """The run saves its tokenizer (with any tokens a format added) next to the adapter; else the base's."""
    source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else Path(model.name_or_path)
    return load_pretrained_tokenizer(source)


def save_merged(model: Any, tokenizer: Any, out: Path, provenance: dict[str, Any], replace: bool = False) -> None:
    """Save aside, then rename: an interrupted merge never leaves a half-written model at ``out``."""
    with atomic_folder(out, replace=replace) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
