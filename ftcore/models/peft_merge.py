"""Merging a PEFT adapter into its base, always at 16/32-bit (never into 4-bit weights).

Shared by the bundled adapter plugins' ``ftcore_merge_adapter`` (not a plugin itself).
Merging into 4-bit weights would round ``W + BA`` back onto the coarse NF4 grid and
lose most of what the adapter learned, so the base is loaded unquantized here even when
the adapter was trained on a 4-bit base (QLoRA).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftcore.errors import ConfigError
from ftcore.models.hub import parse_hub_id
from ftcore.models.loading import load_pretrained_model, load_pretrained_tokenizer
from ftcore.models.paths import resolve_model_path

DTYPES = ("float32", "bfloat16", "float16")


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The folder's PEFT adapter_config.json when it is a LoRA adapter, else None."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc}); the adapter folder is damaged.") from None
    return cfg if str(cfg.get("peft_type", "")).upper() == "LORA" else None


def base_dtype(base: Path, dtype: str) -> str:
    """``auto``: the dtype the base was saved in when it is 16/32-bit, else float32."""
    if dtype != "auto":
        return dtype
    try:
        saved = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    found = saved.get("dtype") or saved.get("torch_dtype")
    return found if found in DTYPES else "float32"


def merge_peft_adapter(adapter_dir: str, base_path: str | None, dtype: str = "auto") -> Any:
    """Load the base unquantized, apply the LoRA adapter and fold it into the weights.

    Returns a plain transformers model, or None when ``adapter_dir`` is not a LoRA adapter.
    """
    cfg = read_adapter_config(adapter_dir)
    if cfg is None:
        return None
    import torch
    from peft import PeftModel

    named = base_path or cfg.get("base_model_name_or_path")
    if not base_path and named and parse_hub_id(named) is not None:   # recorded by id (ftcore does for Hub bases)
        named = str(resolve_model_path(named, revision=cfg.get("revision")))
    base = Path(named) if named else None
    if base is None or not (base / "config.json").is_file():
        where = "given with --base" if base_path else f"recorded in {Path(adapter_dir) / 'adapter_config.json'}"
        raise ConfigError(f"the base model {named!r} {where} is not a model folder (no config.json there). "
                          f"Pass --base with the folder of the model the adapter was trained on.")
    model = load_pretrained_model(base, dtype=getattr(torch, base_dtype(base, dtype)), device_map={"": "cpu"})
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        vocab = len(load_pretrained_tokenizer(adapter_dir))
        if vocab > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(vocab)   # tokens a format added during training
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise ConfigError(f"the adapter in {adapter_dir} does not fit the base model {base}: its weights have other "
                          f"shapes ({str(exc).strip().splitlines()[-1].strip()}). It was trained on another base: "
                          f"pass --base with the model it was trained on.") from None
    merged.config.use_cache = True
    return merged
