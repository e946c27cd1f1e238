"""Optimizer: bitsandbytes PagedAdamW8bit (8-bit Adam states, paged to CPU RAM under GPU memory pressure).

It takes the trainer's learning rate, betas, epsilon and weight decay (``training.*``).
Paging needs CUDA; elsewhere it says so once and uses bitsandbytes' non-paged AdamW8bit,
whose states are just as 8-bit. bitsandbytes keeps 32-bit states for tensors smaller than
``min_8bit_size`` elements (4096), as it does everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

import ftcore

NAME = "paged-adamw-8bit"
log = logging.getLogger("ftcore.paged-adamw-8bit")


def parameter_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; biases and norm weights (1-D tensors) get no weight decay, as in the trainer."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@ftcore.hookimpl
def ftcore_build_optimizer(model: Any, training_args: Any, config: Any) -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ftcore.PluginError("the paged-adamw-8bit plugin needs bitsandbytes: "
                                 "pip install 'ftcore[paged-adamw-8bit]'") from exc
    import torch

    kwargs = dict(lr=training_args.learning_rate, betas=(training_args.adam_beta1, training_args.adam_beta2),
                  eps=training_args.adam_epsilon, weight_decay=training_args.weight_decay)
    groups = parameter_groups(model, training_args.weight_decay)
    if torch.cuda.is_available():
        return bnb.optim.PagedAdamW8bit(groups, **kwargs)
    log.warning("paged-adamw-8bit: no CUDA device, so no paging; using bitsandbytes' non-paged AdamW8bit "
                "(8-bit optimizer states all the same).")
    return bnb.optim.AdamW8bit(groups, **kwargs)


@ftcore.hookimpl
def ftcore_memory_profile(config: Any) -> ftcore.OptimizerProfile:
    # bitsandbytes' blockwise 8-bit Adam: 2 one-byte states per param plus an fp32 absmax per 256 values of each.
    return ftcore.OptimizerProfile(
        label="8-bit AdamW", state_bytes=2, block_size=256, block_bytes=2 * 4, min_size=4096, small_state_bytes=8,
        assumptions="2 states of 1 byte per trained param (+ one fp32 constant per 256 values of each), fp32 "
                    "states (8 bytes) for tensors under 4096 elements, as bitsandbytes keeps them.")
