"""Merging a PEFT adapter into its base, always at 16/32-bit (never into 4-bit weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def merge_peft_adapter(adapter_dir: str, base_path: str | None, dtype: str = "float32") -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = base_path or cfg.get("base_model_name_or_path")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(adapter))
    if len(tok) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return merged, tok
