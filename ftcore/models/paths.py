"""Where a model comes from: a local transformers folder, a Hugging Face Hub id (``org/name``, optionally
``@revision``: ``ftcore.models.hub``), or a builtin model ftcore builds (``ftcore:NAME``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftcore.errors import ConfigError
from ftcore.models.builtin import BUILTIN_PREFIX, BUILTINS, builtin_model
from ftcore.models.hub import check_remote_code, fetch_model, parse_hub_id


def resolve_model_path(path: str, log: Callable[[str], None] = print, *, revision: str | None = None,
                       trust_remote_code: bool = False, weights: bool = True) -> Path:
    """The model's local folder: a checked folder (config + safetensors weights), a Hub id fetched into the
    Hugging Face cache (``revision``: a branch, tag or commit; default the default branch), or a builtin model
    built on first use. A model that needs its own code is refused unless ``trust_remote_code``.
    ``weights=False``: the config and tokenizer are enough (``ftcore prepare``); a Hub model's weights are not
    downloaded."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ConfigError(f"model {path!r}: unknown builtin model; available: "
                              + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS) + ".")
        return builtin_model(name, log)
    ref = parse_hub_id(path, revision)
    if ref is not None:
        found = fetch_model(ref, log, trust_remote_code=trust_remote_code, weights=weights)
        return check_model_folder(found.path, str(ref), trust_remote_code, weights)
    if revision:
        raise ConfigError(f"model.revision ({revision!r}) applies to a Hub id (org/name), and {path} is not one.")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"model path {folder} does not exist. Pass --model with the folder of a transformers "
                          f"model (config.json, *.safetensors, tokenizer files), a Hub id such as "
                          f"Qwen/Qwen2.5-0.5B-Instruct, or ftcore:tiny-llama.")
    return check_model_folder(folder, str(folder), trust_remote_code, weights)


def resolve_run_model(model: Any, log: Callable[[str], None] = print) -> Path:
    """The run's base model (``config.model``) as a local folder.

    A Hub model is pinned: ``model.path`` becomes its id and ``model.revision`` the commit it resolved to,
    so that the run's config.yaml repeats the run with the same weights.
    """
    ref = parse_hub_id(model.path, model.revision)
    if ref is None:
        return resolve_model_path(model.path, log, revision=model.revision, trust_remote_code=model.trust_remote_code)
    found = fetch_model(ref, log, trust_remote_code=model.trust_remote_code)
    folder = check_model_folder(found.path, str(ref), model.trust_remote_code)
    model.path, model.revision = found.repo_id, found.commit
    return folder


def check_model_folder(folder: Path, name: str, trust_remote_code: bool = False, weights: bool = True) -> Path:
    """Refuse a folder that is not a transformers model with safetensors weights, or that needs remote code."""
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model folder {folder} has no config.json: it is not a transformers model folder.")
    if weights and not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise ConfigError(f"model folder {folder} has weights only as pickle files (*.bin/*.pt), which can run "
                              f"code when loaded; ftcore loads safetensors only (see docs/safety.md). Convert them "
                              f"once where you trust the source: AutoModelForCausalLM.from_pretrained(folder)"
                              f".save_pretrained(new_folder).")
        raise ConfigError(f"model folder {folder} has no weights (*.safetensors). Copy the model's weight files "
                          f"into it, or point --model at the folder that has them.")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder / 'config.json'}: not readable JSON ({exc}).") from None
    check_remote_code(config if isinstance(config, dict) else {}, name, trust_remote_code)
    return folder
