"""Tiny models built in-process: a byte-level BPE tokenizer trained on a few texts and a random
Llama-architecture model, saved to a folder and loaded back the way a user's model is.

The builtin model (``ftcore:tiny-llama``) is built with these; ``ftcore.testing`` offers them
to plugin authors' tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
                seed: int = 0, tie_word_embeddings: bool = False, vocab_size: int | None = None) -> Path:
    """Save a random Llama-architecture model and the tokenizer to ``folder``; return the folder.

    ``vocab_size`` (at least the tokenizer's) gives the model more vocabulary rows than the tokenizer has
    tokens, e.g. a 128k-row output layer as Llama 3's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=hidden_size, num_hidden_layers=layers,
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
