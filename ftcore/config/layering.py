"""Layering a run's configuration: defaults < YAML file (or dict) < flags (``--set key=value``)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from ftcore.errors import ConfigError


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}).") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys (plugins:, model:, data:, ...).")
    return data


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["training.learning_rate=1e-4", "lora.r=8"]`` -> nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f'--set "{item}": expected KEY=VALUE, e.g. --set training.learning_rate=1e-4.')
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _put(out, key.strip().split("."), value)
    return out


def _put(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = tree.get(k)
        if not isinstance(node, dict):
            node = tree[k] = {}
        tree = node
    tree[keys[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two config dicts; ``top`` wins, lists are replaced whole."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def layer(source: str | os.PathLike | dict | None, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Combine the file (or dict) layer and the flags layer; defaults come from the schemas."""
    if source is None:
        base: dict[str, Any] = {}
    elif isinstance(source, dict):
        base = copy.deepcopy(source)
    else:
        base = load_yaml(source)
    return deep_merge(base, flags or {})
