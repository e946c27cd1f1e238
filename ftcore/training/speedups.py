"""Training speedups that leave the loss unchanged (up to float rounding).

Each is on by default where it is safe and can be turned off in the config:

- ``training.sparse_logits``: compute the language-model head and the loss only at the
  positions that predict a supervised token. With response-only labels most prompt
  positions need no logits at all, and the vocabulary projection is the largest single
  matmul of a small model. The loss is the same sum over the same targets, divided by
  the same count, as transformers' causal-LM loss.
- ``training.packed_attention``: with padding-free packing, attention runs per example
  inside the packed row (one causal SDPA call per example) instead of over the whole
  row with a block-diagonal mask, which computes and then discards every cross-example
  score. On CUDA with flash-attn installed, its varlen kernel does the same job.

The switches are applied by :func:`apply` (attention) and :class:`FastLossTrainer`
(the loss, whose paths are in :mod:`ftcore.training.loss`), both called from the engine.
"""

from __future__ import annotations

from typing import Any

PACKED_ATTENTION = "ftcore_packed_sdpa"


# -- packed attention ---------------------------------------------------------------

_last_segments: list[Any] = [None, None]   # ((position_ids, version), segments): computed once per forward


def _segments(position_ids: Any) -> list[tuple[int, int]] | None:
    """``[(start, end), ...]`` of the examples in a packed row (batch 1), from restarting positions."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    # The same tensor object reaches every layer; holding it keeps its identity from being reused.
    key = (position_ids, position_ids._version)
    if _last_segments[0] is not None and _last_segments[0][0] is position_ids and _last_segments[0][1] == key[1]:
        return _last_segments[1]
    pos = position_ids[0]
    starts = (pos == 0).nonzero().flatten().tolist()   # one device sync per forward pass
    segments = list(zip(starts, starts[1:] + [pos.numel()])) if starts and starts[0] == 0 else None
    _last_segments[:] = [key, segments]
    return segments


def packed_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """SDPA per packed example (no work across examples); plain SDPA for anything else."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    if attention_mask is not None and attention_mask.dim() == 2:
        # A padded batch (not packed): a causal mask that also hides padded keys.
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    segments = _segments(position_ids) if attention_mask is None and query.shape[2] == key.shape[2] else None
    if not segments or len(segments) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                   dropout=dropout, scaling=scaling, **kwargs)[0] for a, b in segments]
    return torch.cat(outs, dim=1), None


def _register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    # Like flash attention, it needs no 4D mask: None when there is no padding, else the 2D mask.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, flash_attention_mask)


def packed_attention_supported(model: Any) -> str | None:
    """Why per-example attention cannot replace this model's attention, or None when it can."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in ("sdpa", PACKED_ATTENTION):
        return f"the model uses {current!r} attention (only sdpa is replaced)"
    for key in ("sliding_window", "attn_logit_softcapping", "attention_chunk_size"):
        if getattr(config, key, None):
            return f"the model's config sets {key}"
    if not getattr(model, "_supports_attention_backend", False):
        return "the model does not support custom attention functions"
    return None


def flash_attention_usable(precision: str) -> bool:
    """Whether flash-attn's varlen kernel can serve the run's packed rows: a CUDA GPU, flash-attn installed, and
    training in bf16 or fp16 (its kernels take no fp32).

    Decided from the run's settings, not from the model's parameters: the Trainer moves a LoRA or full model to
    the GPU only after this choice, and a QLoRA model's first parameter is its fp32 embedding.
    """
    import importlib.util

    from ftcore.training import devices

    return devices.cuda_available() and precision in ("bf16", "fp16") \
        and importlib.util.find_spec("flash_attn") is not None


def apply(model: Any, config: Any, log: Any = print, precision: str = "fp32") -> str | None:
    """Switch the model to per-example attention for packed rows when enabled and safe; return the name used."""
    if not (config.data.packing and config.training.packed_attention):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    reason = packed_attention_supported(base)
    if reason:
        log(f"packed attention: kept the model's own attention ({reason})")
        return None
    name = "flash_attention_2" if flash_attention_usable(precision) else PACKED_ATTENTION
    if name == PACKED_ATTENTION:
        _register_packed_attention()
    try:
        base.set_attn_implementation(name)
    except (ValueError, ImportError) as exc:   # e.g. a flash-attn build that does not fit this torch
        log(f"packed attention: kept sdpa ({exc})")
        return None
    if name == "flash_attention_2":
        log("packed attention: flash-attn's varlen kernel, given each packed row's boundaries (cu_seq_lens)")
    return name


def restore(model: Any, name: str | None) -> None:
    """Put the model back on SDPA (what a saved model and later generation expect)."""
    if name:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation("sdpa")


# -- the loss: logits only where needed, and never all at once --------------------------

def supports_sparse_logits(model: Any) -> bool:
    from ftcore.training.loss import supports_logits_to_keep

    return supports_logits_to_keep(model)


def sparse_causal_lm_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Any, Any]:
    """The causal-LM loss with logits (all at once) only where the next token is supervised."""
    from ftcore.training.loss import sparse_causal_lm_loss as computed

    return computed(model, inputs, num_items_in_batch)


def fast_loss_trainer_class() -> type:
    """A transformers ``Trainer`` whose loss follows the run's :class:`ftcore.training.loss.LossPlan`: logits
    only at supervised positions (``sparse_logits``), over chunks of positions (``chunked``) or through a
    fused kernel (``fused``); transformers' own loss on the plain path without sparse logits."""
    from transformers import Trainer

    from ftcore.training.loss import LossPlan, causal_lm_loss

    class FastLossTrainer(Trainer):
        loss_plan = LossPlan("sparse", sparse=True)
        sparse_logits = True        # whether logits are computed at supervised positions only (benchmarks read it)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            plan = self.loss_plan
            if not ("labels" in inputs and self.compute_loss_func is None and plan.path != "plain"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            smoothing = 0.0
            if self.label_smoother is not None:
                smoothing = self.label_smoother.epsilon   # transformers passes the count to its smoother always
            elif not self.model_accepts_loss_kwargs:
                num_items_in_batch = None   # as the model's own loss would: a per-batch mean
            loss, outputs = causal_lm_loss(model, inputs, plan, num_items_in_batch, smoothing)
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs \
                    and num_items_in_batch is not None:
                # Mirrors Trainer.compute_loss: the count was summed over processes.
                scale = self.accelerator.num_processes // (self.get_tp_size() if hasattr(self, "get_tp_size") else 1)
                loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
            return (loss, outputs) if return_outputs else loss

    return FastLossTrainer
