"""What the preference objectives (dpo, kto) share: their records, checked and read; the token ids TRL trains on,
and their statistics; the reference model.

Records are plain text (``prompt``, answers as strings) or conversations (``prompt`` a list of messages, each
answer a list of assistant messages). Conversations are rendered by TRL with the tokenizer's chat template (the
one chatml installs when the model has none), so a pair is scored exactly as the chatml format would render the
conversation; plain text is the prompt followed by the answer and the end-of-sequence token.
"""

from __future__ import annotations

import json
from statistics import mean
from types import SimpleNamespace
from typing import Any, Literal

from pydantic import Field

import ftcore

ROLES = ("system", "user", "assistant", "tool")
Problems = list[tuple[str | None, str]]


class ReferenceSettings(ftcore.PluginConfig):
    """The settings both preference objectives share."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (TRL's beta): "
                        "lower lets the policy move further from it.")
    reference: Literal["auto", "precompute"] = Field(
        "auto", description="The reference model: auto is the base with the adapter disabled for lora and qlora "
        "(no second copy of the model) and a frozen copy for full fine-tuning; precompute scores every example "
        "with the reference once before training and keeps no reference in memory (TRL's "
        "precompute_ref_log_probs).")


# -- records -------------------------------------------------------------------------------------------------------

def decoded(value: Any) -> Any:
    """A conversation given as a JSON string (a CSV or Parquet cell) decoded; anything else as it is."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def check_messages(value: Any, field: str, assistant_only: bool) -> Problems:
    if not value:
        return [(field, "is an empty list of messages")]
    found: Problems = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            found.append((where, f"expected a message {{role, content}}, got {type(message).__name__}"))
            continue
        role, content = message.get("role"), message.get("content")
        if assistant_only and role != "assistant":
            found.append((f"{where}.role", f"an answer holds assistant messages only, got {role!r}"))
        elif role not in ROLES:
            found.append((f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}"))
        if not isinstance(content, str):
            found.append((f"{where}.content", f"expected text, got {type(content).__name__}"))
        elif assistant_only and not content.strip():
            found.append((f"{where}.content", "is empty: an answer must say something"))
    return found


def check_prompt(record: dict[str, Any]) -> tuple[Problems, bool | None]:
    """Problems of the record's prompt, and whether it is a conversation (None when it is unusable)."""
    if "prompt" not in record:
        return [("prompt", "missing: a preference record needs the prompt its answers reply to")], None
    prompt = decoded(record["prompt"])
    if isinstance(prompt, str):
        return [], False
    if isinstance(prompt, list):
        found = check_messages(prompt, "prompt", assistant_only=False)
        if not found and prompt[-1].get("role") == "assistant":
            found.append((f"prompt[{len(prompt) - 1}].role", "the prompt ends with an assistant message; it "
                          "should end with the message the answers reply to"))
        return found, True
    return [("prompt", f"expected text or a list of messages, got {type(prompt).__name__}")], None


def check_answer(record: dict[str, Any], key: str, conversation: bool | None) -> Problems:
    if key not in record:
        return [(key, "missing")]
    answer = decoded(record[key])
    if isinstance(answer, str):
        if conversation:
            return [(key, "is text but the prompt is a conversation: give the answer as a list of assistant "
                     'messages, e.g. [{"role": "assistant", "content": "..."}]')]
        return [] if answer.strip() else [(key, "is empty: an answer must say something")]
    if isinstance(answer, list):
        if conversation is False:
            return [(key, "is a list of messages but the prompt is text: give both as text or both as "
                     "conversations")]
        return check_messages(answer, key, assistant_only=True)
    return [(key, f"expected text or a list of assistant messages, got {type(answer).__name__}")]


def check_pair(record: dict[str, Any]) -> Problems:
    """What is wrong with a DPO record ``{prompt, chosen, rejected}``."""
    found, conversation = check_prompt(record)
    found += check_answer(record, "chosen", conversation) + check_answer(record, "rejected", conversation)
    if not found and decoded(record["chosen"]) == decoded(record["rejected"]):
        found.append(("rejected", "is the same as chosen: a pair of equal answers teaches nothing"))
    return found


def check_unpaired(record: dict[str, Any]) -> Problems:
    """What is wrong with a KTO record ``{prompt, completion, label}``."""
    found, conversation = check_prompt(record)
    found += check_answer(record, "completion", conversation)
    if "label" not in record:
        found.append(("label", "missing: true for a desirable completion, false for an undesirable one"))
    elif not isinstance(record["label"], bool):
        found.append(("label", f"expected true (desirable) or false (undesirable), got {record['label']!r}"))
    return found


def rows_of(records: list[tuple[str, dict[str, Any]]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The records' fields TRL takes, conversations decoded to lists of ``{role, content}``; one style per run."""
    rows = []
    styles: dict[bool, str] = {}
    for where, record in records:
        row = {k: decoded(record[k]) for k in keys}
        for k, v in row.items():
            if isinstance(v, list):
                row[k] = [{"role": m["role"], "content": m["content"]} for m in v]
        styles.setdefault(isinstance(row["prompt"], list), where)
        rows.append(row)
    if len(styles) > 1:
        raise ftcore.DataError(f"the preference data mixes plain-text records ({styles[False]}) and conversations "
                               f"({styles[True]}): use one style for every record of a run.")
    return rows


def read(config: Any, tokenizer: Any, ctx: Any, check: Any, keys: tuple[str, ...], tokenize: Any
         ) -> ftcore.PreparedData:
    """Read, check and split the run's records, tokenize them as TRL does, and count what it will train on."""
    import datasets

    train, held_out, stats = ftcore.read_datasets(config, check, ctx.log)
    if any(isinstance(decoded(r["prompt"]), list) for _, r in train[:1]) and not tokenizer.chat_template:
        raise ftcore.DataError(f"{train[0][0]}: the records are conversations but the tokenizer of "
                               f"{config.model.path} has no chat template: add chatml to --plugins (it renders "
                               f"ChatML), or give the records as plain text.")
    tokenized = []
    for part in (train, held_out):
        if not part:
            tokenized.append(None)
            continue
        dataset = datasets.Dataset.from_list(rows_of(part, keys))
        tokenized.append(tokenize(dataset, tokenizer, config))
    train_ds, eval_ds = tokenized
    stats.preference = pair_stats(train_ds, config.data.max_length)
    dropped = len(train) - len(train_ds)
    stats.dropped_too_long = dropped + (len(held_out) - len(eval_ds) if eval_ds is not None else 0)
    if not len(train_ds):
        raise ftcore.DataError(f"no training records are left: every prompt fills data.max_length="
                               f"{config.data.max_length} tokens. Raise data.max_length or shorten the prompts.")
    stats.train_examples, stats.eval_examples = len(train_ds), len(eval_ds) if eval_ds is not None else 0
    answers = [k for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in train_ds.column_names]
    for row in train_ds:
        stats.tokens += sum(len(row["prompt_ids"]) + len(row[k]) for k in answers)
        stats.supervised_tokens += sum(len(row[k]) for k in answers)
    stats.truncated = stats.preference.get("truncated", 0)
    return ftcore.PreparedData(train_ds, eval_ds, stats)


def trl_tokenized(trainer_class: Any, dataset: Any, tokenizer: Any, config: Any, **attributes: Any) -> Any:
    """The dataset with TRL's own token ids (``prompt_ids`` and the answers'), made by the trainer's own
    ``_prepare_dataset``, so the statistics and ``ftcore prepare`` show exactly what the trainer scores. TRL drops
    records whose prompt alone fills ``max_length``."""
    import contextlib
    import sys

    owner = SimpleNamespace(_tokenizer=tokenizer, **attributes)
    args = SimpleNamespace(dataset_num_proc=None, max_length=config.data.max_length, truncation_mode="keep_start",
                           per_device_train_batch_size=config.training.batch_size)
    # TRL orders the processes around its tokenization (main process first) through accelerate's PartialState,
    # which would set up the distributed state before the trainer's arguments do (a DeepSpeed run then fails). The
    # data here is in memory and every rank tokenizes its own copy: no ordering is wanted.
    module = sys.modules[trainer_class.__module__]
    ordering = module.global_then_local_main_first
    module.global_then_local_main_first = contextlib.nullcontext
    try:
        return trainer_class._prepare_dataset(owner, dataset, tokenizer, args, "ftcore")
    finally:
        module.global_then_local_main_first = ordering


def pair_stats(dataset: Any, max_length: int) -> dict[str, Any]:
    """Lengths in tokens, how many sequences the trainer truncates at ``max_length``, and (DPO) how many pairs are
    identical once truncated (the cut fell before the answers differ: such a pair teaches nothing)."""
    prompts = [len(p) for p in dataset["prompt_ids"]]
    out: dict[str, Any] = {"prompt_tokens_mean": round(mean(prompts), 1) if prompts else 0,
                           "prompt_tokens_max": max(prompts, default=0)}
    if "chosen_ids" in dataset.column_names:
        chosen, rejected = dataset["chosen_ids"], dataset["rejected_ids"]
        out["pairs"] = len(prompts)
        out["chosen_tokens_mean"] = round(mean(len(c) for c in chosen), 1) if chosen else 0
        out["rejected_tokens_mean"] = round(mean(len(r) for r in rejected), 1) if rejected else 0
        truncated = identical = 0
        for p, c, r in zip(prompts, chosen, rejected):
            cut = p + max(len(c), len(r)) > max_length
            truncated += cut
            room = max(max_length - p, 0)
            identical += list(c[:room]) == list(r[:room])
        out["truncated"] = truncated
        out["identical_pairs"] = identical
    else:
        completions, labels = dataset["completion_ids"], dataset["label"]
        out["completions"] = len(prompts)
        out["desirable"] = sum(bool(x) for x in labels)
        out["undesirable"] = len(labels) - out["desirable"]
        out["completion_tokens_mean"] = round(mean(len(c) for c in completions), 1) if completions else 0
        out["truncated"] = sum(p + len(c) > max_length for p, c in zip(prompts, completions))
    return out


# -- the trainer ---------------------------------------------------------------------------------------------------

def trl_arguments(args: dict[str, Any], config: Any, settings: ReferenceSettings) -> dict[str, Any]:
    """ftcore's TrainingArguments keyword arguments for a TRL preference config: the same run settings, the
    sequence limit from ``data.max_length``, gradient checkpointing as the run says (TRL's configs default it on)."""
    out = dict(args)
    out.update(max_length=config.data.max_length, beta=settings.beta,
               gradient_checkpointing=bool(args.get("activation_checkpointing")),
               precompute_ref_log_probs=settings.reference == "precompute",
               dataset_num_proc=None)
    return out


def reference_model(model: Any, settings: ReferenceSettings, precision: str = "fp32") -> Any:
    """A frozen copy of a fully fine-tuned model to score against, in the training precision's dtype (autocast
    computes in it anyway); None with an adapter (disabled for the reference) or with precomputed scores."""
    import copy

    import torch

    if settings.reference == "precompute" or hasattr(model, "peft_config"):
        return None
    ref = copy.deepcopy(model)
    if precision in ("bf16", "fp16"):
        ref.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def adapter_disabled_for_reference(trainer: Any, ctx: Any) -> None:
    """With a new adapter, the reference is the base with the adapter disabled. TRL keeps a frozen copy of an
    adapter it is given (named "ref") as the reference, which is right for an adapter a run continues (the
    reference is then the model the run starts from, e.g. the SFT adapter: a copy of the adapter, not of the
    model); a new adapter is the base itself, so its copy is dropped."""
    model = trainer.model
    if ctx.continue_adapter is None and hasattr(model, "peft_config") and "ref" in model.peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")


def ftcore_trainer_class(trainer_class: type) -> type:
    """The TRL trainer class, saving the trained adapter alone (not TRL's frozen reference copy of a continued
    adapter, which PEFT would save beside it) and leaving the model card to ftcore (TRL writes a README into every
    checkpoint)."""
    import shutil
    from pathlib import Path

    class Trainer(trainer_class):
        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            return None

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            super()._save(output_dir, state_dict)
            shutil.rmtree(Path(output_dir or self.args.output_dir) / "ref", ignore_errors=True)

    Trainer.__name__ = Trainer.__qualname__ = trainer_class.__name__
    return Trainer


def memory_profile(label: str, config: Any) -> ftcore.ObjectiveProfile:
    """Two sequences per example; with full fine-tuning and ``reference: auto``, the frozen reference copy."""
    settings = config.section(label)
    return ftcore.ObjectiveProfile(
        label=label, sequences_per_example=2, reference_copy=settings.reference == "auto",
        assumptions="two sequences per example; the reference scores them without gradients (no activations kept); "
                    "full fine-tuning keeps a frozen copy of the model in the precision's dtype, adapters none.")


# -- padding-free (packed) preference batches --------------------------------------------------------------------

def pack_forward(model: Any) -> None:
    """Run the model padding-free on preference batches: TRL's padded batch (chosen and rejected rows, right-padded)
    is packed into one row of real tokens with positions restarting per sequence, so nothing is computed for
    padding, and the per-token outputs are put back in the padded layout TRL's loss reads. The loss, the reference
    scoring and the metrics are TRL's, unchanged.

    Sequences stay apart inside the packed row as in supervised packing: restarting ``position_ids`` make
    transformers mask across sequences, and ftcore's per-example attention (``training.packed_attention``, on plain
    SDPA) runs one causal attention per sequence. Wraps the forward TRL gave the model (its fused LM head); a call
    without ``fused_lm_head`` (generation) is left alone.
    """
    import functools

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused = base.forward

    @functools.wraps(fused)
    def packed(*args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if not fused_lm_head or args or mask is None or ids is None or mask.dim() != 2 \
                or kwargs.get("position_ids") is not None:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        return packed_call(fused, ids, mask, labels, kwargs)

    base.forward = packed


def packed_call(fused: Any, ids: Any, mask: Any, labels: Any, kwargs: dict[str, Any]) -> Any:
    """One fused forward over the batch's real tokens; its per-token outputs unpacked to the padded layout."""
    import torch

    real = mask.bool()
    lengths = real.sum(dim=1)
    starts = torch.cumsum(lengths, 0) - lengths
    position_ids = (torch.arange(real.shape[1], device=ids.device)[None, :].expand_as(real))[real][None, :]
    packed_labels = labels[real].clone()
    packed_labels[starts[lengths > 0]] = -100   # a sequence's first token: the one before it is another sequence's
    rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
    out = fused(input_ids=ids[real][None, :], position_ids=position_ids, labels=packed_labels[None, :],
                fused_lm_head=True, **rest)
    # padded position (i, j) scores token j + 1 of row i: in the packed row, the output at token (i, j)'s place
    place = (torch.cumsum(real.flatten(), 0) - 1).view_as(real)[:, :-1]
    scored = real[:, 1:]
    source = place[scored]
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
        value = getattr(out, name, None)
        if value is None:
            continue
        padded = value.new_zeros(scored.shape)
        padded[scored] = value[0, source]
        setattr(out, name, padded)
    return out


def padding_free(trainer: Any, config: Any, ctx: Any) -> None:
    """With ``data.packing`` (the default), the policy and a frozen reference copy run padding-free
    (``pack_forward``); ``trainer.ftcore_padding_free`` tells ftcore's token count that only real tokens are
    computed. ``data.packing: false`` keeps TRL's padded batches."""
    if not config.data.packing:
        return
    pack_forward(trainer.model)
    if trainer.ref_model is not None:
        pack_forward(trainer.accelerator.unwrap_model(trainer.ref_model))
    trainer.ftcore_padding_free = True
    ctx.log("packing: preference batches run padding-free (positions restart per sequence)")
