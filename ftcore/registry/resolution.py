"""Resolving a run: layer the configuration, select the plugins, validate every section, run the checks.

Everything short of loading a model or data; ``ftcore run --dry-run`` stops here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ftcore.config.checks import check_config, check_dataset_formats
from ftcore.config.layering import layer
from ftcore.config.schema import RunConfig
from ftcore.config.validation import validate
from ftcore.errors import ConfigError, PluginError
from ftcore.registry.discovery import installed_entry_points
from ftcore.registry.pluginset import PluginSet
from ftcore.registry.selection import select

LR_WARN = 5e-4


def resolve(source: Any = None, flags: dict[str, Any] | None = None,
            plugin_objects: list[Any] | tuple = (), log: Callable[[str], None] = print, defaults: bool = True
            ) -> tuple[RunConfig, PluginSet]:
    """Layer, select plugins and validate: everything short of loading a model or data.

    ``defaults``: add the default plugin of each kind the run does not name (False for commands
    that load only what they are told, such as ``ftcore export``).
    """
    if isinstance(source, RunConfig):
        source = source.to_dict()
    raw = layer(source, flags)
    names = raw.get("plugins") or []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f'config key "plugins": expected a list of plugin names, got {names!r}.')
    raw["plugins"] = names
    plugins = select(names, plugin_objects, dataset_formats(raw), defaults=defaults)
    config = validate(raw, plugin_schemas(plugins), list(installed_entry_points()))
    config.plugins = plugins.names()
    check_config(config)   # resume, early stopping and trackers
    check_dataset_formats(config, plugins.names("format"))
    if config.training.learning_rate > LR_WARN:
        log(f"warning: training.learning_rate={config.training.learning_rate:g} is above {LR_WARN:g}, "
            f"a known way to ruin a fine-tune; 1e-4 to 2e-4 is the usual range for LoRA.")
    return config, plugins


def dataset_formats(raw: dict[str, Any]) -> list[str]:
    """Format plugins the datasets of a raw config ask for by name (``format:``)."""
    data = raw.get("data") or {}
    found = []
    if isinstance(data, dict):
        for key in ("datasets", "eval_datasets"):
            specs = data.get(key) or []
            specs = specs if isinstance(specs, list) else [specs]
            found += [s["format"] for s in specs if isinstance(s, dict) and isinstance(s.get("format"), str)]
    return found


def plugin_schemas(plugins: PluginSet) -> dict[str, type]:
    """Each config section the plugins own, with the pydantic schema that validates it.

    A plugin owns the section named after it; it may declare more (``{"lora": ...}`` from qlora).
    When two plugins declare a section of one name, the plugin of that name owns it; two others
    declaring it differently is an error.
    """
    declared: dict[str, list[tuple[str, type]]] = {}
    for name in plugins.names():
        for got in plugins.call_one(name, "ftcore_config_schema") or []:
            if got is None:
                continue
            sections = got if isinstance(got, dict) else {name: got}
            for section, schema in sections.items():
                declared.setdefault(section, []).append((name, schema))
    schemas: dict[str, type] = {}
    for section, owners in declared.items():
        own = [schema for owner, schema in owners if owner == section]
        distinct = {schema for _, schema in owners}
        if not own and len(distinct) > 1:
            who = " and ".join(repr(o) for o, _ in owners)
            raise PluginError(f'plugins {who} each declare a config section "{section}" with different schemas; '
                              f"a section has one owner. Leave one of them out.")
        schemas[section] = own[0] if own else owners[0][1]
    return schemas
