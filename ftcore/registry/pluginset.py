"""The plugins of one run, registered in a fresh pluggy manager (two runs in one process share nothing).

Registering checks each hook implementation against its spec (a misspelt hook or argument is
an error with a suggestion), and wraps it so that an unexpected exception names the plugin and
the package it came from. ``FTCORE_TRACE_PLUGINS=1`` prints every hook call.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import pluggy

from ftcore import hookspecs
from ftcore.errors import FtcoreError, PluginError, PluginFailure, suggest
from ftcore.registry.discovery import PluginInfo, describe, hooks_of, kind_of

HOOK_NAMES = tuple(n for n in vars(hookspecs) if n.startswith("ftcore_"))


class PluginSet:
    """The plugins chosen for one run. What plugins use of it: ``names(kind)``, ``kind(name)``,
    ``hook`` (call a hook on every plugin) and ``call_one(name, hook_name, **kwargs)``."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("ftcore")
        self.pm.add_hookspecs(hookspecs)
        self._objects: dict[str, Any] = {}
        self._kinds: dict[str, str] = {}
        self.infos: dict[str, PluginInfo] = {}
        self._tracing = os.environ.get("FTCORE_TRACE_PLUGINS") not in (None, "", "0")
        if self._tracing:
            self._enable_trace()

    @property
    def hook(self) -> Any:
        """``plugins.hook.ftcore_xxx(**kwargs)`` calls a hook on every selected plugin."""
        return self.pm.hook

    def add(self, name: str, obj: Any, info: PluginInfo | None = None) -> None:
        """Register one plugin under ``name``; refuses a second plugin of that name or the same object twice."""
        if name in self._objects:
            if self._objects[name] is obj:
                return
            raise PluginError(f'two different plugins are called "{name}": rename one (a plugin object\'s `name` '
                              f"attribute), or leave one out.")
        if self.pm.is_registered(obj):
            other = self.pm.get_name(obj)
            raise PluginError(f'plugin "{name}" is the same plugin as "{other}": it was both named (in --plugins / '
                              f"plugins:) and passed as an object. Name it or pass it, not both.")
        kind = kind_of(obj, name)
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            raise PluginError(f'plugin "{name}" is invalid: {exc}{_hint(str(exc))}') from exc
        self._objects[name] = obj
        self._kinds[name] = kind
        self.infos[name] = info or PluginInfo(name=name, description=describe(obj), hooks=hooks_of(obj))
        self.infos[name].kind = kind
        self._guard(name)

    def names(self, kind: str | None = None) -> list[str]:
        """The plugins' names, in the order they were added (of one kind when ``kind`` is given)."""
        return [n for n in self._objects if kind is None or self._kinds[n] == kind]

    def kind(self, name: str) -> str:
        return self._kinds[name]

    def call_one(self, name: str, hook_name: str, **kwargs: Any) -> Any:
        """Call a hook on one named plugin only (e.g. the format a dataset asks for)."""
        others = [p for n, p in self._objects.items() if n != name]
        caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
        return caller(**kwargs)

    def one_caller(self, name: str, hook_name: str) -> Any:
        """``call_one(name, hook_name, **kwargs)`` made once, to be called many times (a format's hooks, on every
        record): the plugin's implementation is called directly when it has exactly one, as pluggy would call it
        (same arguments, same result), without building a hook caller for each call. Register no plugin while
        using it."""
        caller = getattr(self.hook, hook_name)
        impls = [i for i in caller.get_hookimpls() if i.plugin_name == name]
        if self._tracing or len(impls) != 1 or impls[0].wrapper or impls[0].hookwrapper:
            return functools.partial(self.call_one, name, hook_name)
        fn, argnames = impls[0].function, impls[0].argnames
        firstresult = bool(caller.spec and caller.spec.opts.get("firstresult"))

        def call(**kwargs: Any) -> Any:
            result = fn(*[kwargs[a] for a in argnames])
            return result if firstresult else ([] if result is None else [result])

        return call

    def call_each(self, hook_name: str, names: list[str] | None = None, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Call a hook plugin by plugin (only the ``names`` given, if any), in the order one hook call takes
        (``tryfirst`` first, ``trylast`` last), yielding ``(name, results)`` as each returns, so that the caller
        can act on one plugin's answer before the next plugin runs (exporters see earlier exporters' outputs).
        Wrapper implementations wrap each of the calls."""
        impls = getattr(self.hook, hook_name).get_hookimpls()
        wrappers = {i.plugin_name for i in impls if i.wrapper or i.hookwrapper}
        for impl in reversed(impls):
            name = impl.plugin_name
            if name in wrappers or (names is not None and name not in names):
                continue
            others = [p for n, p in self._objects.items() if n != name and n not in wrappers]
            yield name, self.pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)

    def origin(self, name: str) -> str:
        """'package foo 1.2' for a plugin from an installed package, 'module bar' for another object."""
        info = self.infos.get(name)
        if info is not None and info.distribution:
            return f"package {info.distribution} {info.version or ''}".rstrip()
        obj = self._objects.get(name)
        module = getattr(obj, "__module__", None) or getattr(obj, "__name__", None) or "?"
        if not isinstance(obj, type) and not hasattr(obj, "__file__"):
            module = type(obj).__module__ if module == "?" else module
        return f"module {module}"

    def versions(self) -> list[dict[str, Any]]:
        """What plugins.json records: name, kind, distribution and version of each plugin."""
        return [{"name": n, "kind": self._kinds[n], "distribution": self.infos[n].distribution,
                 "version": self.infos[n].version} for n in self._objects]

    def _guard(self, name: str) -> None:
        """Wrap the plugin's hook functions so an unexpected exception names the plugin and its package."""
        for caller in self.pm.get_hookcallers(self.pm.get_plugin(name)) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin_name == name and not (impl.wrapper or impl.hookwrapper):
                    impl.function = _guarded(impl.function, name, caller.name, self)

    def _enable_trace(self) -> None:
        def before(hook_name, hook_impls, kwargs):  # noqa: ANN001 - pluggy's monitoring signature
            names = ", ".join(i.plugin_name for i in hook_impls) or "(no plugin)"
            print(f"[ftcore trace] {hook_name} -> {names}", file=sys.stderr)

        def after(outcome, hook_name, hook_impls, kwargs):  # noqa: ANN001
            impls = [i.plugin_name for i in hook_impls]
            exc = outcome.exception
            shown = f"raised {type(exc).__name__}: {exc}" if exc is not None else f"returned {_short(outcome.get_result())}"
            who = impls[-1] if len(impls) == 1 else ",".join(impls)
            print(f"[ftcore trace] {hook_name} <- {who or '(no plugin)'} {shown}", file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)


def _hint(message: str) -> str:
    """A 'did you mean' for a misspelt hook name or hook argument in pluggy's validation message."""
    unknown = re.search(r"unknown hook '(\w+)'", message)
    if unknown:
        return suggest(unknown.group(1), HOOK_NAMES) or f" Hooks: {', '.join(HOOK_NAMES)}."
    args = re.search(r"Plugin '[^']*' for hook '(\w+)'.*?Argument\(s\) \{([^}]*)\}", message, re.S)
    if args and args.group(1) in HOOK_NAMES:
        import inspect

        valid = list(inspect.signature(getattr(hookspecs, args.group(1))).parameters)
        hints = [suggest(a.strip(" '\""), valid) for a in args.group(2).split(",")]
        return "".join(h for h in hints if h) + f" {args.group(1)} takes: {', '.join(valid)}."
    return ""


def _guarded(fn: Any, plugin: str, hook_name: str, plugins: PluginSet) -> Any:
    root = code_root(plugins._objects.get(plugin, fn))

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FtcoreError:
            raise   # a plugin reporting a user error: passed through unchanged
        except Exception as exc:
            if not raised_in(exc, root):
                raise   # raised by ftcore or a library the plugin called: not the plugin's bug to report
            raise PluginFailure(
                f'plugin "{plugin}" ({plugins.origin(plugin)}) failed in {hook_name}: {type(exc).__name__}: {exc}. '
                f"This is a bug in that plugin: report it to its authors with the traceback above, "
                f"or leave the plugin out of --plugins."
            ) from exc

    return call


def code_root(obj: Any) -> str | None:
    """Where a plugin's own code lives: the folder of its top-level package, or its module's file."""
    import inspect

    module = inspect.getmodule(obj) or inspect.getmodule(type(obj))
    if module is None:
        return None
    top = sys.modules.get(module.__name__.split(".")[0], module)
    path = getattr(top, "__file__", None)
    if not path:
        return None
    return os.path.dirname(path) if os.path.basename(path) == "__init__.py" else path


def raised_in(exc: BaseException, root: str | None) -> bool:
    """Whether the innermost frame of the exception's traceback is in the plugin's own code."""
    tb = exc.__traceback__
    if tb is None or root is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return filename == root or filename.startswith(root.rstrip(os.sep) + os.sep)


def _short(value: Any) -> str:
    text = repr(value) if not hasattr(value, "named_parameters") else type(value).__name__
    return text if len(text) < 80 else text[:77] + "..."


def quantized_adapters(config: Any, ctx: Any) -> list[str]:
    """Selected adapter plugins that load quantized (4-bit) base weights.

    An adapter plugin says how it stores the base weights in its memory profile
    (``ftcore_memory_profile`` returning ``ftcore.MemoryProfile(base_storage="4bit")``), as the
    bundled qlora plugin does.
    """
    from ftcore.types import MemoryProfile

    found = []
    for name in ctx.plugins.names("adapter"):
        for profile in ctx.plugins.call_one(name, "ftcore_memory_profile", config=config, ctx=ctx) or []:
            if isinstance(profile, MemoryProfile) and profile.base_storage == "4bit":
                found.append(name)
    return found
