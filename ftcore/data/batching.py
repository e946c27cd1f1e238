"""Batches for the trainer: padding-free packing (one row, positions restarting per example) or padded
batches, each counting the real, supervised and computed positions it builds."""

from __future__ import annotations

from typing import Any

from ftcore.data.labels import IGNORE_INDEX


class TokenCounter:
    """Counts real, supervised and computed (incl. padding) positions of the batches trained on.

    Batches are counted when a training step takes them (``add_batch``), not when they are built:
    evaluation batches go through the same collator, and the data loader builds a batch ahead of
    the step that uses it (a checkpoint would otherwise count a batch its resumed run trains again).
    """

    def __init__(self) -> None:
        self.real = self.supervised = self.computed = 0

    def add_batch(self, batch: dict[str, Any], padding_free: bool = False) -> None:
        """Count a batch a training step takes; ``padding_free``: the model computes its real tokens only (a
        padded batch the trainer packs itself, as a preference objective's may)."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(ids.numel())
        self.computed += real if padding_free else int(ids.numel())
        self.real += real
        if "labels" in batch:
            self.supervised += int((batch["labels"] != IGNORE_INDEX).sum())
        elif "completion_mask" in batch:   # a preference batch (TRL): the scored answer tokens
            self.supervised += int(batch["completion_mask"].sum())


class PackedCollator:
    """Padding-free packing: the batch's examples become one row; position_ids restart per example.

    transformers turns restarting ``position_ids`` into a block-diagonal attention mask
    for every attention implementation (when no KV cache is used, hence ``use_cache=False``
    in the batch), so examples never attend to each other; the first label of each
    example is masked so no loss crosses a boundary.

    ``flash_attention``: the batch also carries the examples' boundaries as flash-attn's varlen kernel takes them
    (``cu_seq_lens_q/k``, ``max_length_q/k``), computed once here on the CPU; without them transformers derives
    them from ``position_ids`` in every layer, each time with a wait for the GPU.
    """

    def __init__(self, flash_attention: bool = False) -> None:
        from transformers import DataCollatorWithFlattening

        self.flash_attention = flash_attention
        self.inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                                return_flash_attn_kwargs=flash_attention)
        self.counter = TokenCounter()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        # transformers derives the block-diagonal mask from position_ids only without a KV cache;
        # a model loaded with use_cache on (e.g. in eval mode) would otherwise attend across examples.
        batch["use_cache"] = False
        return batch


class PaddedCollator:
    """Pads each batch to its longest example (right padding, labels -100, attention mask 0)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id
        self.counter = TokenCounter()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad] * (longest - n))
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * (longest - n))
            mask.append([1] * n + [0] * (longest - n))
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                 "attention_mask": torch.tensor(mask)}
        return batch


def supports_packing(model: Any) -> bool:
    """Whether a model takes ``position_ids`` (transformers then masks packed examples from each other)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "position_ids" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def make_collator(packing: bool, tokenizer: Any, model: Any = None,
                  log: Any = print) -> PackedCollator | PaddedCollator:
    """Padding-free packing by default; padded batches when asked, or when the model cannot take packing."""
    if packing and model is not None and not supports_packing(model):
        log(f"warning: {type(model).__name__} does not take position_ids, so examples cannot be packed without "
            f"attending to each other; padding batches instead (data.packing: false).")
        packing = False
    if not packing:
        return PaddedCollator(tokenizer.pad_token_id)
    return PackedCollator(flash_attention=model is not None and _uses_flash_attention(model))


def _uses_flash_attention(model: Any) -> bool:
    # flash-attention takes packed rows' boundaries as cu_seqlens rather than position_ids
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == "flash_attention_2"
