"""Exporting a finished run (or a model folder) through exporter plugins: what ``ftcore export`` does.

The exporters get what they get at the end of a run: the run's own resolved configuration
(its config.yaml, with ``--set`` on top), its plugins, its result (metrics and data statistics
from summary.json) and, through ``ctx.export_output``, the ``--output`` path. Only the
plugins the run used and the ones named are loaded, and only the named exporters are called.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftcore import runfolder
from ftcore.config.layering import deep_merge
from ftcore.errors import ConfigError, PluginError
from ftcore.files import write_json_atomic
from ftcore.models.hub import parse_hub_id
from ftcore.registry.discovery import hooks_of, installed_entry_points, load_entry_point
from ftcore.registry.resolution import resolve
from ftcore.reporting.card import ensure_model_card
from ftcore.tools.adapter_merge import merging_plugins
from ftcore.training.chain import is_run_model, resolve_from_run
from ftcore.types import RunContext, RunResult


def export(model: str, output: str | None, plugins: list[str], *, base: str | None = None,
           sets: dict[str, Any] | None = None, overwrite: bool = False, plugin_objects: list[Any] | tuple = (),
           strict: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """Export ``model`` (a run folder, its adapter/ or model/ folder, or a model folder) with the exporter
    plugins named in ``plugins`` (or passed in ``plugin_objects``); return the paths written.

    ``output``: where the exporters write (``ctx.export_output``); default: where they write in a run
    (a run folder is needed then). ``strict``: an exporter's failed check of its output is an error
    (``strict_exports``).
    """
    model_dir = _model_folder(Path(model))
    run_dir = runfolder.run_holding(model_dir, levels=1)
    is_adapter = (model_dir / "adapter_config.json").is_file()
    if run_dir is None and output is None:
        raise ConfigError(f"--model {model} is not a run's output folder, so there is no default place to export "
                          f"to: pass --output.")
    if run_dir is not None:
        raw = runfolder.read_config(run_dir)
        used = [n for n in runfolder.plugins_used(run_dir) if n not in plugins]
        raw.update(plugins=[*plugins, *used], output_dir=str(run_dir), overwrite=overwrite, resume=None)
        if base:
            # --base replaces the run's base, and the commit the run recorded for it
            raw["model"] = {**(raw.get("model") or {}), "path": base, "revision": None}
    else:
        adapters = merging_plugins(model_dir, any_installed=True).names() if is_adapter else []
        chosen_adapter = adapters[:1] if is_adapter and not _names_an_adapter(plugins) else []
        raw = {"plugins": [*plugins, *chosen_adapter], "output_dir": str(Path(output).parent),
               "overwrite": overwrite,
               "model": ({"path": base} if base else _adapter_base(model_dir) if is_adapter
                         else {"path": str(model_dir)})}
    if strict:
        raw["strict_exports"] = True
    config, chosen = resolve(deep_merge(raw, sets or {}), plugin_objects=plugin_objects, log=log, defaults=False)
    exporters = [n for n in chosen.names("exporter") if n in plugins or n not in raw["plugins"]]
    if not exporters:
        raise PluginError(f"no exporter plugin among {', '.join(plugins) or '(none)'}: pass one with --plugins "
                          f"(`ftcore plugins` lists them with their kinds).")
    ctx = RunContext(config=config, plugins=chosen, output_dir=Path(config.output_dir), log=log,
                     export_output=Path(output) if output else None,
                     result=_run_result(run_dir, model_dir, chosen))
    if is_run_model(config.model.path):   # the run trained on a finished run: the base it resolved it to
        ctx.model_path = resolve_from_run(ctx)
    if run_dir is not None and (run_dir / runfolder.MERGED).is_dir() and is_adapter:
        merged = run_dir / runfolder.MERGED
        ctx.merged_dir = merged if (merged / "config.json").is_file() else None
    written: list[Path] = []
    for _, answers in chosen.call_each("ftcore_export", exporters, run_dir=run_dir or model_dir, model_dir=model_dir,
                                       config=config, ctx=ctx):
        new = [Path(p) for paths in answers for p in paths or []]
        written += new
        ctx.result.exports += new   # the next exporter sees them (hub-push uploads a GGUF file written just now)
    if run_dir is not None and runfolder.read_summary(run_dir):
        ensure_model_card(ctx)   # a run from before model cards gets one
        _record(run_dir, written, ctx.result.export_details)
    return written


def _record(run_dir: Path, written: list[Path], details: dict[str, Any]) -> None:
    """Add what this export wrote and checked to the finished run's summary.json."""
    summary = runfolder.read_summary(run_dir)
    summary["exports"] = list(dict.fromkeys([*summary.get("exports", []), *map(str, written)]))
    summary["export_details"] = {**(summary.get("export_details") or {}), **details}
    write_json_atomic(run_dir / runfolder.SUMMARY, summary)


def _names_an_adapter(names: list[str]) -> bool:
    installed = installed_entry_points()
    return any(name in installed and "ftcore_merge_adapter" in hooks_of(load_entry_point(name, installed[name]))
               for name in names)


def _run_result(run_dir: Path | None, model_dir: Path, chosen: Any) -> RunResult:
    """What ``ctx.result`` holds: the finished run's summary, or an empty result for a bare model folder."""
    if run_dir is None:
        return RunResult(output_dir=model_dir.parent, model_dir=model_dir, plugins=chosen.versions())
    summary = runfolder.read_summary(run_dir)
    result = RunResult(output_dir=run_dir, model_dir=model_dir, plugins=summary.get("plugins") or chosen.versions(),
                       metrics=summary.get("metrics") or {}, data_stats=summary.get("data_stats") or {},
                       base_model_license=summary.get("base_model_license"),
                       export_details=summary.get("export_details") or {},
                       sample_prompts=summary.get("sample_prompts") or [])
    for key in ("config_path", "metrics_path", "report_path"):
        if summary.get(key):
            setattr(result, key, Path(summary[key]))
    result.exports = [Path(p) for p in summary.get("exports") or []]
    return result


def _model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise ConfigError(f"--model {path}: no such folder. Pass a run's output folder, its adapter/ or model/ "
                          f"folder, or a transformers model folder.")
    if runfolder.is_run(path):
        found = runfolder.saved_model_dir(path)
        if found is None:
            raise ConfigError(f"--model {path} is an ftcore run without a saved adapter or model (did it finish?).")
        return found
    return path


def _adapter_base(adapter_dir: Path) -> dict[str, Any]:
    """The ``model`` section for the base an adapter names (a folder, or a Hub id with its commit)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    found = cfg.get("base_model_name_or_path")
    if not found:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base model: pass it with --base.")
    return {"path": found, "revision": cfg.get("revision")} if parse_hub_id(found) else {"path": found}
