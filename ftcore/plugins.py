"""Plugin discovery (entry points), selection and a fresh pluggy manager per run."""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import pluggy
import yaml

from ftcore import hookspecs
from ftcore.errors import FtcoreError, PluginError, PluginFailure, suggest

GROUP = "ftcore.plugins"

# Which hook makes a plugin which kind; the first match wins.
KIND_HOOKS: dict[str, tuple[str, ...]] = {
    "format": ("ftcore_format_record",),
    "adapter": ("ftcore_load_model",),
    "optimizer": ("ftcore_build_optimizer",),
    "strategy": ("ftcore_training_arguments", "ftcore_launch"),
    "exporter": ("ftcore_export",),
}
# Kinds of which one run uses at most one plugin.
SINGLE_KINDS = ("adapter", "optimizer", "strategy")


@dataclass
class PluginInfo:
    """What `ftcore plugins` shows about one installed plugin."""

    name: str
    kind: str | None = None
    distribution: str | None = None
    version: str | None = None
    description: str = ""
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def installed_entry_points() -> dict[str, md.EntryPoint]:
    """The entry points of the ``ftcore.plugins`` group, by plugin name."""
    found: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return dict(sorted(found.items()))


def _dist_of(ep: md.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def load_entry_point(name: str, ep: md.EntryPoint) -> Any:
    """Import one plugin; a failure names the plugin and the package it came from."""
    try:
        return ep.load()
    except Exception as exc:  # any import-time failure of third-party code
        dist, version = _dist_of(ep)
        raise PluginError(
            f'plugin "{name}" (package {dist or "unknown"} {version or ""}, entry point '
            f'{ep.value}) failed to import: {type(exc).__name__}: {exc}. '
            f"Fix or uninstall that package, or leave the plugin out of --plugins."
        ) from exc


def hooks_of(obj: Any) -> list[str]:
    """Names of the ftcore hooks an object implements."""
    return sorted(
        n for n in dir(obj)
        if n.startswith("ftcore_") and hookimpl_opts(getattr(obj, n, None)) is not None
    )


def hookimpl_opts(fn: Any) -> dict | None:
    return getattr(fn, "ftcore_impl", None)


def kind_of(obj: Any) -> str:
    implemented = set(hooks_of(obj))
    for kind, names in KIND_HOOKS.items():
        if implemented.intersection(names):
            return kind
    return "extension"


def describe(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def describe_installed() -> list[PluginInfo]:
    """Import every installed plugin and describe it; an import failure becomes the row's error."""
    rows = []
    for name, ep in installed_entry_points().items():
        dist, version = _dist_of(ep)
        info = PluginInfo(name=name, distribution=dist, version=version)
        try:
            obj = load_entry_point(name, ep)
        except PluginError as exc:
            info.error = str(exc.__cause__ or exc)
        else:
            info.kind = kind_of(obj)
            info.description = describe(obj)
            info.hooks = hooks_of(obj)
        rows.append(info)
    return rows


@cache
def default_plugins() -> dict[str, str]:
    text = resources.files("ftcore").joinpath("defaults.yaml").read_text()
    return dict(yaml.safe_load(text)["default_plugins"])


def plugin_name_of(obj: Any) -> str:
    """The name of a plugin object passed directly (not through an entry point)."""
    name = getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return str(name).rsplit(".", 1)[-1]


class PluginSet:
    """The plugins chosen for one run, registered in a fresh PluginManager."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("ftcore")
        self.pm.add_hookspecs(hookspecs)
        self.objects: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}
        self.infos: dict[str, PluginInfo] = {}
        if os.environ.get("FTCORE_TRACE_PLUGINS") not in (None, "", "0"):
            self._enable_trace()

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def add(self, name: str, obj: Any, info: PluginInfo | None = None) -> None:
        if name in self.objects:
            return
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name) if self.pm.has_plugin(name) else None
            raise PluginError(f'plugin "{name}" is invalid: {exc}') from exc
        self.objects[name] = obj
        self.kinds[name] = kind_of(obj)
        self.infos[name] = info or PluginInfo(
            name=name, kind=self.kinds[name], description=describe(obj), hooks=hooks_of(obj)
        )
        self._guard(name)

    def _guard(self, name: str) -> None:
        """Wrap the plugin's hook functions so an unexpected exception names the plugin and its package."""
        for caller in self.pm.get_hookcallers(self.pm.get_plugin(name)) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin_name == name and not (impl.wrapper or impl.hookwrapper):
                    impl.function = _guarded(impl.function, name, caller.name, self)

    def origin(self, name: str) -> str:
        """'package foo 1.2' for an installed plugin, 'module bar' for an object passed directly."""
        info = self.infos.get(name)
        if info is not None and info.distribution:
            return f"package {info.distribution} {info.version or ''}".rstrip()
        obj = self.objects.get(name)
        module = getattr(obj, "__module__", None) or getattr(obj, "__name__", None) or "?"
        if not isinstance(obj, type) and not hasattr(obj, "__file__"):
            module = type(obj).__module__ if module == "?" else module
        return f"module {module}"

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n in self.objects if kind is None or self.kinds[n] == kind]

    def call_one(self, name: str, hook_name: str, **kwargs: Any) -> Any:
        """Call a hook on one named plugin only (e.g. the format a dataset asks for)."""
        others = [p for n, p in self.objects.items() if n != name]
        caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
        return caller(**kwargs)

    def _enable_trace(self) -> None:
        def before(hook_name, hook_impls, kwargs):
            names = ", ".join(i.plugin_name for i in hook_impls) or "(no plugin)"
            print(f"[ftcore trace] {hook_name} -> {names}", file=sys.stderr)

        def after(outcome, hook_name, hook_impls, kwargs):
            impls = [i.plugin_name for i in hook_impls]
            exc = outcome.exception
            if exc is not None:
                shown = f"raised {type(exc).__name__}: {exc}"
            else:
                result = outcome.get_result()
                shown = f"returned {_short(result)}"
            who = impls[-1] if len(impls) == 1 else ",".join(impls)
            print(f"[ftcore trace] {hook_name} <- {who or '(no plugin)'} {shown}", file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)

    def versions(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "kind": self.kinds[n], "distribution": self.infos[n].distribution,
             "version": self.infos[n].version}
            for n in self.objects
        ]


def _guarded(fn: Any, plugin: str, hook_name: str, plugins: PluginSet) -> Any:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FtcoreError:
            raise   # a plugin reporting a user error: passed through unchanged
        except Exception as exc:
            raise PluginFailure(
                f'plugin "{plugin}" ({plugins.origin(plugin)}) failed in {hook_name}: {type(exc).__name__}: {exc}. '
                f"This is a bug in that plugin: report it to its authors with the traceback above, "
                f"or leave the plugin out of --plugins."
            ) from exc

    return call


def _short(value: Any) -> str:
    text = repr(value) if not hasattr(value, "named_parameters") else type(value).__name__
    return text if len(text) < 80 else text[:77] + "..."


def select(names: list[str], objects: list[Any] | tuple = (), formats: list[str] = ()) -> PluginSet:
    """Build the PluginSet for a run.

    ``names`` are entry-point names; ``objects`` are plugin objects passed directly;
    ``formats`` are format names datasets ask for. Defaults are added for the kinds
    none of them provides. Only what is chosen is imported.
    """
    chosen = PluginSet()
    for obj in objects:
        chosen.add(plugin_name_of(obj), obj)
    wanted = list(dict.fromkeys([*names, *[f for f in formats if f]]))
    wanted = [n for n in wanted if n not in chosen.objects]
    installed = installed_entry_points()
    check_installed(wanted, installed)
    for name in wanted:
        _add_entry_point(chosen, name, installed[name])
    _check_single_kinds(chosen)
    present = set(chosen.kinds.values())
    for kind, name in default_plugins().items():
        if kind not in present and name in installed:
            _add_entry_point(chosen, name, installed[name])
    return chosen


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
    chosen = PluginSet()
    for obj in objects:
        chosen.add(plugin_name_of(obj), obj)
    broken: dict[str, str] = {}
    for name, ep in (installed if installed is not None else installed_entry_points()).items():
        if name in chosen.objects:
            continue
        try:
            _add_entry_point(chosen, name, ep)
        except PluginError as exc:
            broken[name] = str(exc)
    return chosen, broken


def _add_entry_point(chosen: PluginSet, name: str, ep: md.EntryPoint) -> None:
    dist, version = _dist_of(ep)
    obj = load_entry_point(name, ep)
    info = PluginInfo(name=name, kind=kind_of(obj), distribution=dist, version=version,
                      description=describe(obj), hooks=hooks_of(obj))
    chosen.add(name, obj, info)


def _check_single_kinds(chosen: PluginSet) -> None:
    for kind in SINGLE_KINDS:
        named = chosen.names(kind)
        if len(named) > 1:
            raise PluginError(
                f"plugins {' and '.join(repr(n) for n in named)} are both of kind {kind!r}, "
                f"and a run uses one {kind}. Keep one of them in --plugins / plugins:."
            )
