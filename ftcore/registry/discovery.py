"""Finding plugins: the ``ftcore.plugins`` entry point group, importing one plugin, and what a plugin is.

Nothing here imports a plugin that was not asked for, except ``describe_installed`` (``ftcore
plugins``), which imports each one to describe it and reports an import failure as that row's error.
"""

from __future__ import annotations

import importlib.metadata as md
import types
from dataclasses import dataclass, field
from typing import Any

from ftcore.errors import PluginError
from ftcore.hookspecs import EXTENSION, KIND_HOOKS

GROUP = "ftcore.plugins"


@dataclass
class PluginInfo:
    """What `ftcore plugins` shows, and plugins.json records, about one plugin."""

    name: str
    kind: str | None = None
    distribution: str | None = None
    version: str | None = None
    description: str = ""
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def installed_entry_points() -> dict[str, md.EntryPoint]:
    """The entry points of the ``ftcore.plugins`` group, by plugin name."""
    found: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return dict(sorted(found.items()))


def distribution_of(ep: md.EntryPoint) -> tuple[str | None, str | None]:
    """``(distribution name, version)`` of the package that declares an entry point."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def load_entry_point(name: str, ep: md.EntryPoint) -> Any:
    """Import one plugin; a failure names the plugin and the package it came from."""
    try:
        return ep.load()
    except Exception as exc:  # any import-time failure of third-party code
        dist, version = distribution_of(ep)
        raise PluginError(
            f'plugin "{name}" (package {dist or "unknown"} {version or ""}, entry point '
            f'{ep.value}) failed to import: {type(exc).__name__}: {exc}. '
            f"Fix or uninstall that package, or leave the plugin out of --plugins."
        ) from exc


def hookimpl_opts(fn: Any) -> dict | None:
    return getattr(fn, "ftcore_impl", None)


def hooks_of(obj: Any) -> list[str]:
    """Names of the ftcore hooks an object implements (marked ``@ftcore.hookimpl``)."""
    return sorted(
        n for n in dir(obj)
        if n.startswith("ftcore_") and hookimpl_opts(getattr(obj, n, None)) is not None
    )


def kind_of(obj: Any, name: str = "") -> str:
    """The plugin's kind: set by the one kind hook it implements (``hookspecs.KIND_HOOKS``).

    Configuration, lifecycle and adjustment hooks never decide a kind, nor does a wrapper around a
    kind hook; a plugin implementing none of the kind hooks is an ``extension``. Two kind hooks in
    one plugin is an error.
    """
    implemented = {n for n in hooks_of(obj)
                   if not (hookimpl_opts(getattr(obj, n)) or {}).get("wrapper")
                   and not (hookimpl_opts(getattr(obj, n)) or {}).get("hookwrapper")}   # wrapping is not answering
    kinds = [kind for kind, hook in KIND_HOOKS.items() if hook in implemented]
    if len(kinds) > 1:
        hooks = " and ".join(KIND_HOOKS[k] for k in kinds)
        raise PluginError(f'plugin "{name or describe_object(obj)}" implements {hooks}, which make it both '
                          f"{' and '.join(kinds)}; a plugin is of one kind. Split it into one plugin per kind.")
    return kinds[0] if kinds else EXTENSION


def describe(obj: Any) -> str:
    """The first line of the plugin's docstring."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def describe_object(obj: Any) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


def describe_installed() -> list[PluginInfo]:
    """Import every installed plugin and describe it; an import failure becomes the row's error."""
    rows = []
    for name, ep in installed_entry_points().items():
        dist, version = distribution_of(ep)
        info = PluginInfo(name=name, distribution=dist, version=version)
        try:
            obj = load_entry_point(name, ep)
            info.kind = kind_of(obj, name)
        except PluginError as exc:
            info.error = str(exc.__cause__ or exc)
        else:
            info.description = describe(obj)
            info.hooks = hooks_of(obj)
        rows.append(info)
    return rows


# -- plugins passed as objects ----------------------------------------------------------

def module_of(obj: Any) -> str:
    """The module a plugin object lives in (the module itself for a module plugin)."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return getattr(obj, "__module__", None) or type(obj).__module__


def entry_point_of(obj: Any, installed: dict[str, md.EntryPoint]) -> tuple[str, md.EntryPoint] | None:
    """The installed entry point that loads this very object, if any (found without importing others)."""
    module = module_of(obj)
    for name, ep in installed.items():
        if ep.module != module:
            continue
        if isinstance(obj, types.ModuleType) and not ep.attr:
            return name, ep
        if ep.attr:
            try:
                if ep.load() is obj:
                    return name, ep
            except Exception:  # a broken entry point is not this object
                continue
    return None


def identify(obj: Any, installed: dict[str, md.EntryPoint]) -> PluginInfo:
    """Name and origin of a plugin passed as an object.

    The name is the object's declared ``name`` attribute, else the name of the installed entry point
    that loads it, else its module's last component. The distribution and version are the installed
    package's: the entry point's, else the distribution that provides the object's top-level module.
    """
    found = entry_point_of(obj, installed)
    declared = getattr(obj, "name", None)
    if isinstance(declared, str) and declared:
        name = declared
    elif found is not None:
        name = found[0]
    else:
        name = module_of(obj).rsplit(".", 1)[-1] if isinstance(obj, types.ModuleType) else \
            (getattr(obj, "__name__", None) or type(obj).__name__)
    dist, version = distribution_of(found[1]) if found is not None else _distribution_of_module(module_of(obj))
    return PluginInfo(name=name, distribution=dist, version=version, description=describe(obj), hooks=hooks_of(obj))


def _distribution_of_module(module: str) -> tuple[str | None, str | None]:
    top = module.split(".", 1)[0]
    try:
        names = md.packages_distributions().get(top) or []
    except Exception:  # a broken installation's metadata must not break a run
        return None, None
    if not names:
        return None, None
    try:
        return names[0], md.version(names[0])
    except md.PackageNotFoundError:
        return names[0], None
