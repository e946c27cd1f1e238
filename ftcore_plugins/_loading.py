"""Model loading shared by the bundled adapter plugins (not a plugin itself)."""

from __future__ import annotations

from typing import Any

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(config: Any, ctx: Any) -> Any:
    import torch

    name = config.model.dtype
    if name == "auto":
        name = DTYPES.get(ctx.precision, "float32")
    return getattr(torch, name)


def load_base_model(model_path: str, tokenizer: Any, config: Any, ctx: Any, **kwargs: Any) -> Any:
    """Load safely (safetensors, no remote code unless configured) and fit embeddings to the tokenizer."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch_dtype(config, ctx))
    model = AutoModelForCausalLM.from_pretrained(
        model_path, trust_remote_code=config.model.trust_remote_code, use_safetensors=True, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    return model
