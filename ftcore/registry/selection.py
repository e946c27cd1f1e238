"""Choosing a run's plugins: those named, those passed as objects, and defaults for the kinds none provides.

Only what is chosen is imported, so a broken or slow unrelated plugin never breaks a run.
"""

from __future__ import annotations

import importlib.metadata as md
from functools import cache
from importlib import resources
from typing import Any

import yaml

from ftcore.errors import PluginError, suggest
from ftcore.hookspecs import SINGLE_KINDS
from ftcore.registry.discovery import (
    PluginInfo,
    describe,
    distribution_of,
    hooks_of,
    identify,
    installed_entry_points,
    kind_of,
    load_entry_point,
)
from ftcore.registry.pluginset import PluginSet


@cache
def default_plugins() -> dict[str, str]:
    """The plugin used for a kind the run does not name (registry/defaults.yaml: data, not code)."""
    text = resources.files("ftcore.registry").joinpath("defaults.yaml").read_text()
    return dict(yaml.safe_load(text)["default_plugins"])


@cache
def fallback_plugins() -> dict[str, str]:
    """The plugin whose hook answers for a kind none of a run's plugins provides, without joining the run's
    plugins (registry/defaults.yaml): the ``sft`` objective."""
    text = resources.files("ftcore.registry").joinpath("defaults.yaml").read_text()
    return dict(yaml.safe_load(text).get("fallback_plugins") or {})


def fallback(kind: str) -> PluginSet:
    """A PluginSet of the fallback plugin of ``kind`` alone (empty when it is not installed)."""
    chosen = PluginSet()
    name = fallback_plugins().get(kind)
    installed = installed_entry_points()
    if name in installed:
        add_entry_point(chosen, name, installed[name])
    return chosen


def select(names: list[str], objects: list[Any] | tuple = (), formats: list[str] | tuple = (),
           defaults: bool = True) -> PluginSet:
    """Build the PluginSet for a run.

    ``names`` are entry-point names; ``objects`` are plugin objects passed directly;
    ``formats`` are format names datasets ask for. With ``defaults``, the default plugin is
    added for each kind none of them provides. Only what is chosen is imported.
    """
    chosen = PluginSet()
    installed = installed_entry_points()
    add_objects(chosen, objects, installed)
    passed = [n for n in dict.fromkeys(names) if n in chosen.names()]
    if passed:
        raise PluginError(f'plugin "{passed[0]}" is both named (in --plugins / plugins:) and passed as an object '
                          f"(plugins=[...]): name it or pass it, not both.")
    wanted = list(dict.fromkeys([*names, *[f for f in formats if f]]))
    wanted = [n for n in wanted if n not in chosen.names()]   # a dataset may ask for a format passed as an object
    check_installed(wanted, installed)
    for name in wanted:
        add_entry_point(chosen, name, installed[name])
    check_single_kinds(chosen)
    if not defaults:
        return chosen
    present = {chosen.kind(n) for n in chosen.names()}
    for kind, name in default_plugins().items():
        if kind not in present and name in installed:
            add_entry_point(chosen, name, installed[name])
    return chosen


def add_objects(chosen: PluginSet, objects: list[Any] | tuple, installed: dict[str, md.EntryPoint]) -> None:
    """Register plugin objects passed directly, named and attributed by ``discovery.identify``."""
    for obj in objects:
        info = identify(obj, installed)
        chosen.add(info.name, obj, info)


def check_installed(names: list[str], installed: dict[str, md.EntryPoint]) -> None:
    """An unknown plugin name is an error that lists the installed ones and suggests the closest."""
    for name in names:
        if name not in installed:
            listing = ", ".join(installed) or "(none)"
            raise PluginError(
                f'unknown plugin "{name}".{suggest(name, installed)} Installed plugins: {listing}. '
                f"`ftcore plugins` lists them with their kinds."
            )


def load_all(objects: list[Any] | tuple = (), installed: dict[str, md.EntryPoint] | None = None
             ) -> tuple[PluginSet, dict[str, str]]:
    """Every installed plugin, plus plugin objects passed directly, in one PluginSet.

    For a command that compares plugins side by side (``ftcore estimate``), not for a run:
    no defaults, no one-per-kind rule. An installed plugin that fails to import or register
    is left out and its error returned, by name, so one broken package never breaks the
    command; an object passed directly must register. ``installed``: the entry points when the
    caller has already read them.
    """
    installed = installed if installed is not None else installed_entry_points()
    chosen = PluginSet()
    add_objects(chosen, objects, installed)
    broken: dict[str, str] = {}
    for name, ep in installed.items():
        if name in chosen.names():
            continue
        try:
            add_entry_point(chosen, name, ep)
        except PluginError as exc:
            broken[name] = str(exc)
    return chosen, broken


def add_entry_point(chosen: PluginSet, name: str, ep: md.EntryPoint) -> None:
    dist, version = distribution_of(ep)
    obj = load_entry_point(name, ep)
    info = PluginInfo(name=name, kind=kind_of(obj, name), distribution=dist, version=version,
                      description=describe(obj), hooks=hooks_of(obj))
    chosen.add(name, obj, info)


def check_single_kinds(chosen: PluginSet) -> None:
    for kind in SINGLE_KINDS:
        named = chosen.names(kind)
        if len(named) > 1:
            raise PluginError(
                f"plugins {' and '.join(repr(n) for n in named)} are both of kind {kind!r}, "
                f"and a run uses one {kind}. Keep one of them in --plugins / plugins:."
            )
