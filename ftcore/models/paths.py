"""Where a model comes from: a local transformers folder, or a builtin model ftcore builds (``ftcore:NAME``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ftcore.errors import ConfigError
from ftcore.models.builtin import BUILTIN_PREFIX, BUILTINS, builtin_model


def resolve_model_path(path: str, log: Callable[[str], None] = print) -> Path:
    """Check a model folder (config + weights), or build a builtin model on first use."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ConfigError(f"model {path!r}: unknown builtin model; available: "
                              + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS) + ".")
        return builtin_model(name, log)
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"model path {folder} does not exist. Pass --model with the folder of a transformers "
                          f"model (config.json, *.safetensors, tokenizer files), or ftcore:tiny-llama.")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model folder {folder} has no config.json: it is not a transformers model folder.")
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise ConfigError(f"model folder {folder} has weights only as pickle files (*.bin/*.pt), which can run "
                              f"code when loaded; ftcore loads safetensors only (see docs/safety.md). Convert them "
                              f"once where you trust the source: AutoModelForCausalLM.from_pretrained(folder)"
                              f".save_pretrained(new_folder).")
        raise ConfigError(f"model folder {folder} has no weights (*.safetensors). Copy the model's weight files "
                          f"into it, or point --model at the folder that has them.")
    return folder
