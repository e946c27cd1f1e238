"""QLoRA: the base model in 4-bit (bitsandbytes NF4, double quantization), LoRA adapters trained on top.

The ``lora`` section configures the adapters (rank, targets, ...) exactly as for the lora
plugin; the ``qlora`` section configures the quantization. The saved adapter holds only
the LoRA weights, so it loads onto the unquantized base as well.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

import ftcore
from ftcore_plugins.adapters.lora import LoraSettings, continued_adapter, lora_config

NAME = "qlora"
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class QLoraConfig(ftcore.PluginConfig):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: NF4 (normal float) or FP4.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype the 4-bit weights are dequantized to for matmuls; auto follows "
                            "training.precision (bf16 where supported, else fp32).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward (QLoRA's usual setting).")
    quant_storage: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the packed 4-bit weights are stored in (bnb_4bit_quant_storage; the same bytes "
                            "either way); auto: uint8, or the compute dtype under the fsdp strategy, which shards "
                            "only floating weights.")


@ftcore.hookimpl
def ftcore_config_schema():
    # The lora section is validated here too, so `--plugins qlora` alone accepts `lora:` options.
    return {NAME: QLoraConfig, "lora": LoraSettings}


def compute_dtype(settings: QLoraConfig, ctx: Any) -> Any:
    import torch

    name = settings.compute_dtype
    if name == "auto":
        name = COMPUTE_DTYPES.get(ctx.precision, "float32")
    return getattr(torch, name)


def quant_storage(settings: QLoraConfig, ctx: Any) -> Any:
    """The dtype the packed 4-bit weights are stored in: a sharding strategy (fsdp) shards them like the other
    weights only when they are stored in a floating dtype, the compute dtype (what FSDP + QLoRA setups use)."""
    import torch

    name = settings.quant_storage
    if name == "auto":
        return compute_dtype(settings, ctx) if "fsdp" in ctx.plugins.names("strategy") else torch.uint8
    return getattr(torch, name)


def quantization_config(settings: QLoraConfig, ctx: Any) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant, bnb_4bit_compute_dtype=compute_dtype(settings, ctx),
        bnb_4bit_quant_storage=quant_storage(settings, ctx))


def device_map() -> dict[str, Any]:
    """Each process holds the whole 4-bit model on its own device (its GPU, or the CPU): ``LOCAL_RANK``'s GPU
    where the process sees them all, its only GPU where it was given one (``CUDA_VISIBLE_DEVICES``)."""
    import torch

    if torch.cuda.is_available():
        return {"": ftcore.local_device_index()}
    return {"": "cpu"}


@ftcore.hookimpl
def ftcore_load_model(model_path: str, tokenizer: Any, config: Any, ctx: Any) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ftcore.PluginError("the qlora plugin needs bitsandbytes: pip install 'ftcore[qlora]'") from exc
    from peft import get_peft_model, prepare_model_for_kbit_training

    settings: QLoraConfig = config.section(NAME)
    model = ftcore.load_base_model(model_path, tokenizer, config, ctx, quantized_on_load=True,
                            dtype=compute_dtype(settings, ctx), quantization_config=quantization_config(settings, ctx),
                            device_map=device_map())
    keep_cpu_layout_trainable(model)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    if ctx.continue_adapter is not None:   # --model is a finished run, and the run keeps training its adapter
        return continued_adapter(model, ctx)
    return get_peft_model(model, lora_config(config.section("lora"), ctx, model))


def keep_cpu_layout_trainable(model: Any) -> None:
    """Stop bitsandbytes (0.50) repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, a Linear4bit's first no-grad forward in eval mode (the
    trainer's evaluation) converts its weights, for good, to a layout served by an op that
    has no autograd: every later training step then gets no gradient through the base
    weights (earlier layers' LoRA weights stop learning), and saving converts them back
    lossily. Keeping the training layout costs some evaluation speed and nothing else.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@ftcore.hookimpl
def ftcore_merge_adapter(adapter_dir: str, base_path: str | None, dtype: str, ctx: Any) -> Any:
    # Merged into the base loaded at 16/32-bit, never into the 4-bit weights (see docs/recipes/merging.md).
    return ftcore.merge_peft_adapter(adapter_dir, base_path, dtype)


@ftcore.hookimpl
def ftcore_memory_profile(config: Any) -> ftcore.MemoryProfile:
    settings: QLoraConfig = config.section(NAME)
    adapters: LoraSettings = config.section("lora")
    constants = "8-bit absmax with double quantization" if settings.double_quant else "fp32 absmax"
    checkpointing = ("gradient checkpointing always on" if settings.gradient_checkpointing
                     else "gradient checkpointing as training.gradient_checkpointing")
    return ftcore.MemoryProfile(
        trains="adapters", base_storage="4bit", double_quant=settings.double_quant,
        always_checkpointing=settings.gradient_checkpointing, adapter_rank=adapters.r,
        adapter_targets=adapters.target_modules,
        assumptions=f"every linear layer but lm_head in 4-bit {settings.quant_type.upper()} (0.5 byte/param + "
                    f"absmax per 64 weights; {constants}); embeddings, lm_head and norms fp32 "
                    f"(prepare_model_for_kbit_training); adapters as for LoRA; {checkpointing}.")
