"""The base model's licence, as its model card (README.md front matter) or config names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

KEYS = ("license", "license_name", "license_link")


def base_model_licence(folder: Path) -> dict[str, Any] | None:
    """``{"license": ..., "source": "README.md", ...}`` or None when neither the card nor config.json names one."""
    card = _front_matter(folder / "README.md")
    found = {k: card[k] for k in KEYS if card.get(k)}
    if found:
        return {**{k: _text(v) for k, v in found.items()}, "source": "README.md"}
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    found = {k: config[k] for k in KEYS if isinstance(config, dict) and config.get(k)}
    if found:
        return {**{k: _text(v) for k, v in found.items()}, "source": "config.json"}
    return None


def _text(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _front_matter(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def describe(licence: dict[str, Any] | None, folder: Path) -> str:
    """The line printed at the start of a run."""
    if not licence:
        return (f"base model licence: not stated in {folder}/README.md or config.json; check the model's terms "
                f"before you use or publish what you train")
    extra = [licence[k] for k in ("license_name", "license_link") if licence.get(k)]
    shown = licence.get("license") or licence.get("license_name")
    more = f" ({', '.join(extra)})" if extra and extra != [shown] else ""
    return (f"base model licence: {shown}{more}, from its {licence['source']}; its terms apply to the model "
            f"you train and to what you publish")
