"""The layout of a run's output folder, in one place: what each file is called and how to read it back.

    OUTPUT/
      ftcore-run.json   marks an ftcore run          config.yaml    the resolved configuration
      plugins.json      the plugins used             metrics.jsonl  one row per log event
      adapter/ | model/ the trained adapter, or the whole model (full fine-tuning)
      checkpoints/      checkpoint-N folders         summary.json   written when training ended
      report.html, plots/, merged/, gguf/ ...        reports and exporters' outputs

Everything that needs to know where a run keeps something (the engine, merge, export,
generate, resume) asks this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "ftcore-run.json"
CONFIG = "config.yaml"
PLUGINS = "plugins.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
REPORT = "report.html"
PLOTS = "plots"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MODEL = "model"
MERGED = "merged"
SAVED_MODEL_DIRS = (MODEL, ADAPTER)    # what a run trains: one of these


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is an ftcore run's output folder."""
    return (Path(folder) / MARKER).is_file()


def run_holding(path: Path, levels: int = 3) -> Path | None:
    """The run folder that is ``path`` or holds it (up to ``levels`` folders up), or None."""
    path = Path(path)
    for folder in [path, *list(path.resolve().parents)[:levels]]:
        if is_run(folder):
            return folder
    return None


def saved_model_dir(run_dir: Path) -> Path | None:
    """The run's trained output: ``model/`` (full fine-tuning) or ``adapter/``; None before the run finished."""
    return next((run_dir / n for n in SAVED_MODEL_DIRS if (run_dir / n).is_dir()), None)


def plugins_used(run_dir: Path, kind: str | None = None) -> list[str]:
    """Names of the plugins the run used (of one kind), from its plugins.json; [] when unreadable."""
    try:
        rows = json.loads((Path(run_dir) / PLUGINS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [r["name"] for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)
            and (kind is None or r.get("kind") == kind)]


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved configuration as a dict ({} when there is none)."""
    import yaml

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json as a dict ({} before the run finished)."""
    try:
        data = json.loads((Path(run_dir) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of the run's metrics.jsonl (a line cut off by a kill is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
