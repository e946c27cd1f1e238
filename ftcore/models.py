"""Model paths: a user's folder, or the small model ftcore builds locally (``ftcore:tiny-llama``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from ftcore.errors import ConfigError

BUILTIN_PREFIX = "ftcore:"
BUILTINS = {"tiny-llama": "tiny-llama-v1"}


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


def builtin_root() -> Path:
    return Path(os.environ.get("FTCORE_CACHE", Path.home() / ".cache" / "ftcore")) / "models"


def builtin_model(name: str, log: Callable[[str], None] = print) -> Path:
    """The small Llama-architecture model for the quickstart, built once, offline, and cached."""
    folder = builtin_root() / BUILTINS[name]
    if (folder / "config.json").exists():
        return folder
    log(f"building the builtin model {BUILTIN_PREFIX}{name} in {folder} (once, offline)...")
    from ftcore.testing import build_model, build_tokenizer

    corpus = resources.files("ftcore").joinpath("assets/tokenizer-corpus.txt").read_text(encoding="utf-8")
    tok = build_tokenizer(corpus.split("\n\n"), vocab_size=1024)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))
    try:
        build_model(tmp, tok, hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384, seed=0)
        (tmp / "README.md").write_text(
            f"---\nlicense: apache-2.0\n---\n# {BUILTIN_PREFIX}{name}\n\nA small Llama-architecture model with random weights and a byte-level "
            "BPE tokenizer, built by ftcore for the offline quickstart and tests. License: Apache-2.0.\n")
        (tmp / "ftcore-builtin.json").write_text(json.dumps({"name": name, "license": "apache-2.0"}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
