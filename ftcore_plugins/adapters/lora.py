"""LoRA adapters with PEFT (r=16, alpha=32, dropout 0.05 on q/k/v/o by default)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

import ftcore

NAME = "lora"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LoraSettings(ftcore.PluginConfig):
    r: int = Field(16, ge=1, description="Rank of the update matrices.")
    alpha: float = Field(32, gt=0, description="Scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(ATTENTION), description='Module names, or "all-linear".')
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained fully and saved.")
    layers_to_transform: list[int] | None = Field(None, description="Only these layer indices.")
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] = True


@ftcore.hookimpl
def ftcore_config_schema():
    return LoraSettings


def lora_config(settings: LoraSettings, ctx: Any, model: Any = None) -> Any:
    """The PEFT LoraConfig for these settings; new tokens (added by a format) get trainable rows."""
    from peft import LoraConfig

    extra: dict[str, Any] = {}
    new_ids = new_token_ids(ctx)
    if new_ids:
        extra["trainable_token_indices"] = token_rows(model, new_ids)
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, bias=settings.bias, use_rslora=settings.use_rslora,
        use_dora=settings.use_dora, modules_to_save=settings.modules_to_save or None,
        layers_to_transform=settings.layers_to_transform, init_lora_weights=settings.init_lora_weights,
        task_type="CAUSAL_LM", **extra)


def token_rows(model: Any, ids: list[int]) -> dict[str, list[int]]:
    """The new tokens' rows to train: in the input embeddings, and in the output layer unless tied to them."""
    if model is None:
        return {"embed_tokens": ids}
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names.get(id(emb), "embed_tokens"): ids}
    if out is not None and id(out) in names and out.weight is not emb.weight:
        rows[names[id(out)]] = ids   # an untied LM head must learn to predict the new tokens too
    return rows


def new_token_ids(ctx: Any) -> list[int]:
    if not ctx.added_tokens or ctx.tokenizer is None:
        return []
    return sorted({ctx.tokenizer.convert_tokens_to_ids(t) for t in ctx.added_tokens})


@ftcore.hookimpl
def ftcore_load_model(model_path: str, tokenizer: Any, config: Any, ctx: Any) -> Any:
    from peft import get_peft_model

    # a launched rank on a GPU machine loads straight onto its GPU (not the whole model in host RAM first)
    model = ftcore.load_base_model(model_path, tokenizer, config, ctx, device_map=ftcore.rank_device_map())
    if config.training.gradient_checkpointing:
        model.enable_input_require_grads()
    if ctx.continue_adapter is not None:   # --model is a finished run, and the run keeps training its adapter
        return continued_adapter(model, ctx)
    return get_peft_model(model, lora_config(config.section(NAME), ctx, model))


def continued_adapter(model: Any, ctx: Any) -> Any:
    """A finished run's adapter, loaded trainable on its base (its own rank and targets; the lora section's
    settings apply to new adapters)."""
    from peft import PeftModel

    ctx.log(f"lora: training on from the adapter in {ctx.continue_adapter}")
    return PeftModel.from_pretrained(model, str(ctx.continue_adapter), is_trainable=True)


@ftcore.hookimpl
def ftcore_merge_adapter(adapter_dir: str, base_path: str | None, dtype: str, ctx: Any) -> Any:
    return ftcore.merge_peft_adapter(adapter_dir, base_path, dtype)


@ftcore.hookimpl
def ftcore_memory_profile(config: Any) -> ftcore.MemoryProfile:
    settings: LoraSettings = config.section(NAME)
    return ftcore.MemoryProfile(
        trains="adapters", base_storage="compute", adapter_rank=settings.r, adapter_targets=settings.target_modules,
        assumptions="frozen base in the precision's dtype; adapters, their gradients and optimizer state fp32 "
                    "(PEFT keeps adapters in fp32).")
