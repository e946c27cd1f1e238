"""Helpers for testing ftcore and its plugins: tiny models, tokenizers and format checks.

Everything is built locally (no hub): a byte-level BPE tokenizer trained in-process
and a Llama-architecture model with random weights, saved to a folder and loaded
back through the same ``from_pretrained`` path a user's model takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ftcore.data import IGNORE_INDEX, Example, tokenize

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained language model to a task with a small dataset.",
    "### Instruction:\nSay hello.\n\n### Response:\nHello!",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "Café, naïve, résumé, emoji 🙂 and unicode ✓ are text too.",
]


def build_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512, chat_template: str | None = None,
                    extra_special_tokens: list[str] | None = None) -> Any:
    """Train a small byte-level BPE tokenizer (Llama-style BOS/EOS, a pad token) in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(texts) or []
    corpus += _DEFAULT_CORPUS
    specials = SPECIAL_TOKENS + list(extra_special_tokens or [])
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=list(extra_special_tokens or []) or None)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_model(folder: str | Path, tokenizer: Any, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate_size: int | None = None, max_positions: int = 2048,
                seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Save a random Llama-architecture model and the tokenizer to ``folder``; return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate_size or hidden_size * 3, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie_word_embeddings,
    )
    model = LlamaForCausalLM(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_model(folder: str | Path, texts: Iterable[str] = (), chat_template: str | None = None,
               **model_kwargs: Any) -> Path:
    """A tokenizer and model in one call: what most plugin tests need."""
    tok = build_tokenizer(texts, chat_template=chat_template)
    return build_model(folder, tok, **model_kwargs)


def check_example(example: Example, tokenizer: Any, strict_boundaries: bool = False) -> list[int]:
    """Check that a format plugin's Example is well formed; return its labels.

    Raises AssertionError when the text is empty, spans fall outside the text, are empty,
    overlap or are out of order, when labels are not aligned with the tokens or differ
    from them, or when no token ends up supervised. With ``strict_boundaries`` a token
    that straddles a span boundary (partly supervised text) is an error too.
    """
    assert isinstance(example, Example), f"expected ftcore.Example, got {type(example).__name__}"
    assert isinstance(example.text, str) and example.text, "the example's text is empty"
    last = 0
    for span in example.supervised:
        assert len(span) == 2 and all(isinstance(x, int) for x in span), f"span {span!r} is not (start, end)"
        start, end = span
        assert 0 <= start < end <= len(example.text), f"span ({start}, {end}) is empty or outside the text"
        assert start >= last, f"supervised span ({start}, {end}) overlaps the previous one or is out of order"
        last = end
    enc = tokenizer(example.text, add_special_tokens=example.add_special_tokens, return_offsets_mapping=True)
    ids, labels = tokenize(example, tokenizer)
    assert ids == list(enc["input_ids"]), "the tokens differ from the tokenizer's own encoding of the text"
    assert len(ids) == len(labels), "labels are not aligned with input ids"
    assert all(lab in (tok, IGNORE_INDEX) for tok, lab in zip(ids, labels)), "a label differs from its token"
    assert any(lab != IGNORE_INDEX for lab in labels), "no token is supervised: the example would teach nothing"
    if strict_boundaries:
        for (start, end), lab in zip(enc["offset_mapping"], labels):
            for s_start, s_end in example.supervised:
                cut = start < s_start < end or start < s_end < end
                assert not cut, (f"token {example.text[start:end]!r} at ({start}, {end}) straddles the boundary of "
                                 f"supervised span ({s_start}, {s_end}): part of it is trained on")
    return labels


def supervised_text(example: Example, tokenizer: Any) -> str:
    """Decode exactly the supervised tokens of an example (for masking tests)."""
    ids, labels = tokenize(example, tokenizer)
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)


def render_supervision(example: Example, tokenizer: Any) -> str:
    """The example as text with its supervised tokens in ``[[...]]`` (what ``ftcore prepare --show`` prints)."""
    from ftcore.prepare import render_marked

    return render_marked(*tokenize(example, tokenizer), tokenizer)


def format_config(plugins: list[Any] | tuple = (), names: list[str] | tuple = (), **sections: Any) -> Any:
    """A validated RunConfig for calling a format plugin's hooks directly in a test.

    ``plugins`` are plugin objects (your module), ``names`` installed plugins by entry-point
    name, ``sections`` config sections, e.g. ``format_config([my_plugin], my_plugin={"x": 1})``.
    """
    from ftcore.engine import resolve

    config, _ = resolve({"model": "unused", "plugins": list(names), **sections}, plugin_objects=plugins,
                        log=lambda m: None)
    return config


def check_format(plugin: Any, record: dict[str, Any], tokenizer: Any, config: Any = None,
                 strict_boundaries: bool = False) -> tuple[Example, list[int]]:
    """Validate one good record with a format plugin, render it, and check the result.

    Returns ``(example, labels)``. Fails when the plugin reports problems with the record
    or renders a malformed example (see :func:`check_example`).
    """
    from ftcore.plugins import select

    config = config if config is not None else format_config([plugin])
    chosen = select([], [plugin])
    name = chosen.names("format")[0] if chosen.names("format") else None
    assert name, f"{plugin!r} implements no ftcore_format_record hook: it is not a format plugin"
    problems = chosen.call_one(name, "ftcore_validate_record", record=record, config=config) or []
    assert not problems, f"the plugin rejected a record expected to be good: {problems}"
    example = chosen.call_one(name, "ftcore_format_record", record=record, tokenizer=tokenizer, config=config)
    return example, check_example(example, tokenizer, strict_boundaries)
