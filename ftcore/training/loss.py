"""The causal-LM loss without the whole vocabulary's logits at once.

For a model with a 128k-token vocabulary the logits, and the fp32 log-probabilities and gradient the
loss keeps for backward, are the largest tensors of a fine-tune: about 3 x tokens x vocab x 4 bytes
(12.6 GB at 4 x 2048 tokens). Three paths compute the same loss:

- ``plain``: the model's own loss (transformers' ``ForCausalLMLoss``), or with ``training.sparse_logits``
  the logits at supervised positions only, all at once (:func:`sparse_causal_lm_loss`).
- ``chunked``: the model runs up to its output layer; the output layer and the cross-entropy then run
  over chunks of positions, each chunk's gradient computed in the same pass (forward and backward of one
  chunk, then the next), so at most one chunk's logits exist at any time. With ``sparse_logits`` only
  supervised positions enter the chunks. Under DeepSpeed ZeRO-3 with a trained output layer (its weight is
  sharded outside its own forward) each chunk is recomputed in backward instead (activation checkpointing); under
  FSDP2 the chunks use the output layer's weights as gathered for the model's own call of it.
- ``fused``: Liger's fused linear cross-entropy, or Apple's Cut Cross-Entropy, when one is installed and the
  model is on a CUDA GPU: the same idea in GPU kernels.

``training.loss: auto`` takes fused where it can run, else chunked where the model allows it, else plain;
the choice and its reason are recorded in the run's summary (``metrics.loss``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from ftcore.data.labels import IGNORE_INDEX

LOSS_CHOICES = ("auto", "chunked", "fused", "plain")
# logits per chunk when training.loss_chunk_size is not set: 16M values (64 MB in fp32) per tensor
CHUNK_LOGITS = 2**24
MIN_CHUNK = 64
# config keys of models that change the logits after the output layer (a chunk must apply them too)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def auto_chunk_size(vocab: int) -> int:
    """Positions per chunk so that a chunk's logits hold about CHUNK_LOGITS values (at least MIN_CHUNK)."""
    return max(MIN_CHUNK, CHUNK_LOGITS // max(vocab, 1))


def _base(model: Any) -> Any:
    """The transformers model inside PEFT (and DeepSpeed/DDP) wrappers."""
    inner = getattr(model, "module", model)        # DeepSpeedEngine, DistributedDataParallel
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def supports_logits_to_keep(model: Any) -> bool:
    """The model's forward takes ``logits_to_keep`` and computes transformers' causal-LM loss."""
    import inspect

    base = _base(model)
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    loss_type = getattr(base, "loss_type", None) or "ForCausalLM"
    return "logits_to_keep" in params and loss_type == "ForCausalLM" \
        and not getattr(base.config, "is_encoder_decoder", False)


def chunking_unsupported(model: Any) -> str | None:
    """Why the output layer cannot be run in chunks outside the model, or None when it can."""
    if not supports_logits_to_keep(model):
        return "the model's forward has no logits_to_keep or its loss is not the causal-LM loss"
    base = _base(model)
    for key in LOGIT_TRANSFORMS:
        value = getattr(base.config, key, None)
        if value not in (None, 0, 1, 1.0):
            return f"the model's config sets {key} (the logits are transformed after the output layer)"
    if base.get_output_embeddings() is None:
        return "the model has no output layer"
    return None


def fused_kernel() -> str | None:
    """The installed fused linear cross-entropy that can run here: liger, cut-cross-entropy, or None."""
    from ftcore.training import devices

    if not devices.cuda_available():
        return None
    if importlib.util.find_spec("liger_kernel") is not None:
        return "liger"
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        return "cut-cross-entropy"
    return None


@dataclass
class LossPlan:
    """How a run computes its loss: ``path`` plain, sparse, chunked or fused."""

    path: str
    sparse: bool = False
    chunk_size: int | None = None
    kernel: str | None = None          # the fused kernel's package
    reason: str = ""                   # why this path (when it is not the one asked for, or auto chose it)

    def describe(self) -> str:
        where = "supervised positions only" if self.sparse else "every position"
        if self.path == "chunked":
            text = f"chunked ({self.chunk_size} positions per chunk, {where})"
        elif self.path == "fused":
            text = f"fused ({self.kernel}, {where})"
        elif self.path == "sparse":
            text = "plain (logits at supervised positions only, all at once)"
        else:
            text = "plain (the model's own loss over every position's logits)"
        return f"{text}; {self.reason}" if self.reason else text

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sparse": self.sparse, "chunk_size": self.chunk_size, "kernel": self.kernel,
                "described": self.describe()}


def choose(model: Any, training: Any) -> LossPlan:
    """The loss path for this model and the run's ``training`` settings (``loss``, ``loss_chunk_size``,
    ``sparse_logits``)."""
    asked = training.loss
    sparse = bool(training.sparse_logits) and supports_logits_to_keep(model)
    plain = LossPlan("sparse" if sparse else "plain", sparse=sparse)
    if asked == "plain":
        return plain
    why_not = chunking_unsupported(model)
    if why_not:
        plain.reason = f"{asked} loss not possible: {why_not}"
        return plain
    vocab = _base(model).get_output_embeddings().weight
    vocab = getattr(vocab, "ds_shape", None) or vocab.shape
    chunk = training.loss_chunk_size or auto_chunk_size(int(vocab[0]))
    kernel = fused_kernel() if asked in ("auto", "fused") else None
    whole_head = _plain_linear(model) is not None
    if kernel and whole_head:
        return LossPlan("fused", sparse=sparse, chunk_size=chunk, kernel=kernel,
                        reason="auto: an installed fused kernel on a CUDA GPU" if asked == "auto" else "")
    if asked == "fused":
        why = ("this machine has no CUDA GPU" if not _cuda() else
               "neither liger-kernel nor cut-cross-entropy is installed" if not kernel else
               "the output layer is not a plain linear layer here (an adapter on it, or a ZeRO-3 sharded weight)")
        return LossPlan("chunked", sparse=sparse, chunk_size=chunk, reason=f"fused loss not possible: {why}")
    return LossPlan("chunked", sparse=sparse, chunk_size=chunk)


def _cuda() -> bool:
    from ftcore.training import devices

    return devices.cuda_available()


def _plain_linear(model: Any) -> Any:
    """The output layer when it is a plain ``nn.Linear`` whose weight is whole here (not ZeRO-3 sharded)."""
    head = _base(model).get_output_embeddings()
    return head if _plain_linear_layer(head) else None


def _plain_linear_layer(head: Any) -> bool:
    import torch

    return type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id")


# -- computing it ----------------------------------------------------------------------

def _shifted(labels: Any) -> Any:
    import torch

    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def _normalise(loss: Any, num_items_in_batch: Any, count: Any) -> Any:
    """Divide a summed loss as transformers does: by ``num_items_in_batch`` when given, else the target count."""
    import torch

    if num_items_in_batch is None:
        return loss / count.clamp(min=1).to(loss.device)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def sparse_causal_lm_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None,
                          label_smoothing: float = 0.0) -> tuple[Any, Any]:
    """The causal-LM loss, computing logits (all at once) only where the next token is supervised.

    Same result as transformers' ``ForCausalLMLoss``: the sum of token cross-entropies over
    shifted labels, divided by ``num_items_in_batch`` when given, else averaged.
    """
    import torch
    import torch.nn.functional as F

    inputs = dict(inputs)
    shifted = _shifted(inputs.pop("labels"))
    keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    if keep.numel() == 0:   # nothing supervised in this batch: a zero loss that still has a graph
        keep = torch.zeros(1, dtype=torch.long, device=shifted.device)
    outputs = model(**inputs, logits_to_keep=keep)
    logits = outputs.logits.float()
    targets = shifted[:, keep].reshape(-1).to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX,
                           reduction="sum", label_smoothing=label_smoothing)
    loss = _normalise(loss, num_items_in_batch, (targets != IGNORE_INDEX).sum())
    outputs.loss = loss
    return loss, outputs


def _hidden_before_head(model: Any, head: Any, inputs: dict[str, Any], keep: Any) -> tuple[Any, Any]:
    """Run the model up to its output layer: the hidden states that enter it (at ``keep``), and the outputs.

    The model runs as usual (its wrappers included: PEFT, DeepSpeed, DDP); a pre-hook on the output layer
    takes its input and hands it an empty slice, so the layer computes no logits at all.
    """
    captured = []

    def take(module: Any, args: tuple) -> tuple:
        if captured:                               # only the model's own call (not ours, per chunk)
            return args
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        outputs = model(**inputs, logits_to_keep=keep)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the model's forward did not call its output layer")
    return captured[0], outputs


class _ChunkedCrossEntropy:
    """Cross-entropy of ``head(hidden)`` against ``targets``, summed, one chunk of rows at a time, each chunk's
    gradients (for the hidden states and the output layer's trained parameters) computed in the same pass."""

    @staticmethod
    def function() -> type:
        import torch
        import torch.nn.functional as F

        class ChunkedCrossEntropy(torch.autograd.Function):
            @staticmethod
            def forward(ctx, hidden, targets, head, chunk, smoothing, linear, *params):  # noqa: ANN001
                grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
                grad_params = [None] * len(params)
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                direct = (linear is not None and not smoothing
                          and not torch.is_autocast_enabled(hidden.device.type))
                for start in range(0, hidden.shape[0], chunk):
                    end = min(start + chunk, hidden.shape[0])
                    if direct:
                        weight, bias = linear
                        loss, grads = _linear_chunk(head, hidden[start:end], targets[start:end], weight, bias,
                                                    grad_hidden is not None, params)
                        if grad_hidden is not None:
                            grad_hidden[start:end] = grads.pop(0)
                        for i, g in enumerate(grads):
                            g = g.to(params[i].dtype)
                            grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
                        total += loss
                        continue
                    with torch.enable_grad():
                        part = hidden[start:end].detach().requires_grad_(hidden.requires_grad)
                        # the logits are not held: backward needs only the log-probabilities cross-entropy keeps
                        loss = F.cross_entropy(head(part).float(), targets[start:end], ignore_index=IGNORE_INDEX,
                                               reduction="sum", label_smoothing=smoothing)
                    wrt = ([part] if grad_hidden is not None else []) + list(params)
                    if wrt and loss.requires_grad:
                        grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
                        if grad_hidden is not None:
                            grad_hidden[start:end] = grads.pop(0)
                        for i, g in enumerate(grads):
                            if g is not None:
                                grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
                    total += loss.detach()
                    del loss
                ctx.grads = (grad_hidden, grad_params)
                return total

            @staticmethod
            def backward(ctx, grad_total):  # noqa: ANN001
                grad_hidden, grad_params = ctx.grads
                ctx.grads = None
                scale = grad_total.to(torch.float32)
                out_hidden = None if grad_hidden is None else (grad_hidden * scale).to(grad_hidden.dtype)
                outs = [None if g is None else (g * scale).to(g.dtype) for g in grad_params]
                return (out_hidden, None, None, None, None, None, *outs)

        return ChunkedCrossEntropy


def _linear_chunk(head: Any, part: Any, targets: Any, weight: Any, bias: Any, want_hidden: bool,
                  params: list[Any]) -> tuple[Any, list[Any]]:
    """One chunk of a plain linear output layer ``head`` (called without a graph): its summed cross-entropy and the gradients, for the hidden
    states (when ``want_hidden``) and for those of ``weight`` and ``bias`` that are in ``params``, in their order.

    Computed directly in one rows x vocabulary buffer: the logits become the softmax in place, then the
    gradient of the loss for the logits (softmax less the one-hot target). Autograd's cross-entropy keeps the
    log-probabilities and builds a one-hot gradient and the softmax besides: several more buffers and passes
    over rows x vocabulary, which made chunks of a 128k vocabulary slower than the plain loss on a CPU.
    """
    import torch

    logits = head(part).float()         # a fresh buffer (no graph: in the Function's forward), fp32 logits
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    logits.sub_(top).exp_()
    norm = logits.sum(dim=1, keepdim=True)
    loss = ((top + norm.log()).squeeze(1) - picked)[valid].sum()
    logits.div_(norm)                                  # the softmax
    logits.scatter_add_(1, safe[:, None], -valid[:, None].to(logits.dtype))
    if not bool(valid.all()):
        logits[~valid] = 0.0
    grad = logits.to(weight.dtype)
    grads = [grad @ weight] if want_hidden else []
    if any(p is weight for p in params):
        grads.append(grad.t() @ part.to(weight.dtype))
    if bias is not None and any(p is bias for p in params):
        grads.append(grad.sum(0))
    return loss, grads


_FUNCTION: list[Any] = []


def chunked_cross_entropy(hidden: Any, targets: Any, head: Any, chunk: int, label_smoothing: float = 0.0) -> Any:
    """The summed cross-entropy of ``head(hidden)`` (rows x hidden) against ``targets`` (rows), computed one
    chunk of rows at a time; never more than one chunk's logits exist.

    The output layer's trained parameters get their gradients through autograd as usual. Where they are
    sharded outside the layer's own forward (DeepSpeed ZeRO-3), each chunk is checkpointed instead: its logits
    are dropped after the forward and recomputed in backward. Under FSDP2 the chunks use the layer's weights
    as its unit gathered them for the model's own call.
    """
    import torch

    params = [p for p in head.parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for p in params):
        return _checkpointed_cross_entropy(hidden, targets, head, chunk, label_smoothing)
    # a plain linear layer whose weight is whole here has its chunks computed directly (_linear_chunk); others
    # (an adapter on the output layer, a ZeRO-3 partitioned weight, an FSDP unit's gathered weights) through autograd
    linear = (head.weight, head.bias) if _plain_linear_layer(head) else None
    if sharded_by_fsdp(head):
        head, params = _gathered_layer(head)
    if not _FUNCTION:
        _FUNCTION.append(_ChunkedCrossEntropy.function())
    if not torch.is_grad_enabled():
        params = []
    return _FUNCTION[0].apply(hidden, targets, head, chunk, label_smoothing, linear, *params)


def sharded_by_fsdp(head: Any) -> bool:
    """The output layer is an FSDP2 unit (``fully_shard``): calling it again runs FSDP's hooks, which expect
    one call per forward and backward pass (computing a chunk's gradients inside the forward crashed them)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:   # a torch without FSDP2
        return False
    return isinstance(head, FSDPModule)


def _gathered_layer(head: Any) -> tuple[Any, list[Any]]:
    """An FSDP2 output layer's gathered weights as a plain function, and its trained parameters.

    The model's own call of the layer (on an empty slice) gathered its weights, and they stay gathered until
    backward ends; the chunks use them directly, outside FSDP's hooks, and their gradients accumulate on the
    gathered parameters, which FSDP reduce-scatters to the shards at the end of backward, as for any layer.
    """
    import torch.nn.functional as F

    head.unshard()      # a no-op when the model's call left them gathered
    weight, bias = head.weight, getattr(head, "bias", None)
    params = [p for p in (weight, bias) if p is not None and p.requires_grad]
    return (lambda x: F.linear(x, weight, bias)), params


def _checkpointed_cross_entropy(hidden: Any, targets: Any, head: Any, chunk: int, label_smoothing: float) -> Any:
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def part_loss(part: Any, part_targets: Any) -> Any:
        return F.cross_entropy(head(part).float(), part_targets, ignore_index=IGNORE_INDEX, reduction="sum",
                               label_smoothing=label_smoothing)

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(part_loss, hidden[start:start + chunk], targets[start:start + chunk],
                                   use_reentrant=False)
    return total


def fused_cross_entropy(hidden: Any, targets: Any, head: Any, kernel: str, label_smoothing: float = 0.0) -> Any:
    """The summed cross-entropy through an installed fused kernel (liger-kernel or cut-cross-entropy)."""
    if kernel == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                                              reduction="sum")
        loss = fn(head.weight, hidden, targets, head.bias)
        return loss[0] if isinstance(loss, tuple) else loss
    from cut_cross_entropy import linear_cross_entropy

    if label_smoothing:
        raise ValueError("cut-cross-entropy has no label smoothing")
    return linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, ignore_index=IGNORE_INDEX,
                                reduction="sum")


def causal_lm_loss(model: Any, inputs: dict[str, Any], plan: LossPlan, num_items_in_batch: Any = None,
                   label_smoothing: float = 0.0) -> tuple[Any, Any]:
    """transformers' causal-LM loss (the sum of token cross-entropies over shifted labels, divided by
    ``num_items_in_batch`` when given, else by the number of targets), by the plan's path."""
    if plan.path in ("plain", "sparse"):
        return sparse_causal_lm_loss(model, inputs, num_items_in_batch, label_smoothing)
    import torch

    inputs = dict(inputs)
    shifted = _shifted(inputs.pop("labels"))
    head = _base(model).get_output_embeddings()
    if plan.sparse:
        keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().flatten()
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long, device=shifted.device)
    else:
        keep = torch.arange(shifted.shape[1], device=shifted.device)
    hidden, outputs = _hidden_before_head(model, head, inputs, keep)
    targets = shifted[:, keep].to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if plan.sparse:                               # only the supervised rows enter the output layer
        rows = (targets != IGNORE_INDEX).nonzero().flatten()
        hidden, targets = hidden[rows], targets[rows]
    if plan.path == "fused" and not (label_smoothing and plan.kernel == "cut-cross-entropy"):
        total = fused_cross_entropy(hidden, targets, head, plan.kernel, label_smoothing)
    else:
        total = chunked_cross_entropy(hidden, targets, head, plan.chunk_size, label_smoothing)
    loss = _normalise(total, num_items_in_batch, (targets != IGNORE_INDEX).sum())
    if hidden.shape[0] == 0:                      # nothing supervised: a zero loss that still has a graph
        loss = loss + hidden.sum() * 0.0
    outputs.loss = loss
    return loss, outputs
