"""Starter configs (``ftcore init``): commented templates in ftcore/templates/*.yaml, filled in and written."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ftcore.errors import ConfigError

TEMPLATES = {
    "lora-alpaca": "LoRA on Alpaca-style instruction data (one GPU or CPU).",
    "qlora-chatml": "QLoRA (4-bit base) on chat conversations: a 7B model on one 24 GB GPU.",
    "deepspeed": "LoRA on several GPUs or machines with DeepSpeed ZeRO.",
}
MODEL_PLACEHOLDER = "path/to/your-model"
DATA_PLACEHOLDER = "path/to/train.jsonl"


def template_text(name: str) -> str:
    """The raw template (with ``{model}``, ``{data}`` and ``{filename}`` fields)."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}.")
    return resources.files("ftcore").joinpath(f"templates/{name}.yaml").read_text(encoding="utf-8")


def render(name: str, model: str | None = None, data: str | None = None, filename: str = "ftcore.yaml") -> str:
    return template_text(name).format(model=model or MODEL_PLACEHOLDER, data=data or DATA_PLACEHOLDER,
                                      filename=filename)


def write_config(path: str | Path, name: str = "lora-alpaca", model: str | None = None, data: str | None = None,
                 force: bool = False) -> Path:
    """Write the starter config; an existing file is kept unless ``force``."""
    target = Path(path)
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; choose another path or pass --force to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(name, model, data, target.name), encoding="utf-8")
    return target
