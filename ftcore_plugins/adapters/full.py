"""Full fine-tuning: all weights trained, optionally freezing named modules or the first N layers."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

import ftcore

NAME = "full"
VOCAB_MULTIPLE = 64


class FullConfig(ftcore.PluginConfig):
    freeze_modules: list[str] = Field(default_factory=list,
                                      description="Regexes of parameter names to freeze (e.g. embed_tokens).")
    freeze_layers: int = Field(0, ge=0, description="Freeze the first N decoder layers.")


@ftcore.hookimpl
def ftcore_config_schema():
    return FullConfig


@ftcore.hookimpl
def ftcore_load_model(model_path: str, tokenizer: Any, config: Any, ctx: Any) -> Any:
    import torch

    cfg: FullConfig = config.section(NAME)
    # Mixed precision: with model.dtype auto the trained weights stay fp32 (master weights) and the
    # trainer autocasts to bf16/fp16; pure 16-bit weights lose small updates (and fp16 cannot be unscaled).
    dtype = torch.float32 if config.model.dtype == "auto" else getattr(torch, config.model.dtype)
    # Added tokens: the embeddings grow to a multiple of 64 rows (GPU matrix kernels run faster on such shapes);
    # the saved model's config.json records the size, and the GGUF export pads its vocabulary to match.
    model = ftcore.load_base_model(model_path, tokenizer, config, ctx, dtype=dtype, vocab_multiple=VOCAB_MULTIPLE,
                                   device_map=ftcore.rank_device_map())   # a launched rank: onto its GPU
    patterns = [re.compile(p) for p in cfg.freeze_modules]
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    for name, param in model.named_parameters():
        layer = layer_re.search(name)
        frozen = any(p.search(name) for p in patterns) or (layer is not None and int(layer.group(1)) < cfg.freeze_layers)
        param.requires_grad_(not frozen)
    return model


@ftcore.hookimpl
def ftcore_memory_profile(config: Any) -> ftcore.MemoryProfile:
    # What ftcore_load_model keeps: fp32 master weights, all trained (freeze_* settings are not modelled).
    return ftcore.MemoryProfile(
        trains="all", base_storage="master",
        assumptions="trained weights fp32 (master weights); with bf16/fp16 precision autocast keeps a 16-bit "
                    "copy of them for the step (counted under weights); gradients fp32.")
