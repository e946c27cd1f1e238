"""Tiny models for the GGUF export tests, one per supported architecture, each with a tokenizer and chat
template of its family: Llama, Qwen2 and Qwen3 (byte-level BPE), Mistral, Gemma 2/3 and Phi-3 (SentencePiece-style).

Weights are drawn with a large spread so that attention is sharp and rotary layout
matters: with the usual 0.02 init every logit is near zero and a wrong Q/K row order
would hide inside any tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPACE = "\u2581"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
MISTRAL_LIKE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
# Gemma's template folds a system prompt into the first user turn and calls the assistant "model".
GEMMA_TEMPLATE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
         "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
         "{% endif %}{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') "
         "+ message['content'] + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<start_of_turn>model\n' }}{% endif %}")
PHI3 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé and Ærøskøbing: accents are text too.",
    "Emoji 🙂🚀 and symbols ✓ → ∞, 日本語.",
    "  leading spaces,\ttabs\nand\n\nnew lines   ",
    "Numbers 3 33 333 3333 and 3.14; it's, we'll, they've.",
]


def corpus() -> list[str]:
    here = Path(__file__).resolve().parent.parent / "ftcore" / "assets" / "tokenizer-corpus.txt"
    return here.read_text(encoding="utf-8").split("\n\n")


def chat_tokenizer() -> Any:
    """The ftcore.testing byte-level BPE tokenizer, with ChatML tokens and template."""
    from ftcore.testing import build_tokenizer

    return build_tokenizer(corpus(), chat_template=CHATML, extra_special_tokens=["<|im_start|>", "<|im_end|>"])


def spm_tokenizer(vocab_size: int = 600, prefix_space: bool = True, specials: tuple[Any, ...] = (),
                  template: str = MISTRAL_LIKE, eos_rstrip: bool = False) -> Any:
    """A Llama-2/Mistral-style tokenizer: BPE over pieces with a visible space, byte fallback.

    Laid out as the Llama 2 tokenizer.json is: <unk>, <s>, </s>, the 256 byte pieces, then the
    learned pieces; a Prepend + Replace normalizer; and the complete merge list (every pair of
    pieces that joins into a piece, ranked by when that piece was learned), which is what makes
    the merges agree with SentencePiece's score-driven merging that llama.cpp implements.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    learner.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = learner.get_vocab()
    rank = {piece: r for r, piece in enumerate(sorted(learned, key=learned.get))}
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p in sorted(learned, key=learned.get) if p not in pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece in pieces[259:]:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in rank and right in rank:
                merges.append((rank[piece], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(merges)]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend(SPACE)] if prefix_space else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if prefix_space else [])])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    from tokenizers import AddedToken

    eos = AddedToken("</s>", rstrip=eos_rstrip, special=True)
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": eos, "unk_token": "<unk>",
                             "additional_special_tokens": list(specials)})
    fast.chat_template = template
    return fast


def build(folder: Path, tokenizer: Any, model_type: str = "llama", hidden: int = 64, layers: int = 2,
          heads: int = 4, kv_heads: int = 2, std: float = 0.25, seed: int = 0, tie: bool = False,
          **extra: Any) -> Path:
    """Save a tiny model of ``model_type`` with large random weights and the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=hidden * 3,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie, **extra)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif param.dim() == 1:
                param.normal_(0, 0.2)
            else:
                param.normal_(0, std)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def split_tokenizer(pattern: str) -> Any:
    """A byte-level BPE whose words come from a Split regex (Llama 3, Qwen2 style), then bytes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=specials[4:])


def qwen3_tokenizer() -> Any:
    """Qwen's byte-level BPE (its split regex) with ChatML turns."""
    tok = split_tokenizer(QWEN2_SPLIT)
    tok.chat_template = CHATML
    return tok


def gemma_tokenizer() -> Any:
    return spm_tokenizer(prefix_space=False, specials=("<start_of_turn>", "<end_of_turn>"), template=GEMMA_TEMPLATE)


def phi3_tokenizer() -> Any:
    """Llama 2's SentencePiece with Phi-3's turn markers (llama.cpp's phi3 looks up <|endoftext|>), set up as
    Phi-3's are: the turn markers and </s> eat the whitespace after them (rstrip), <|endoftext|> does not."""
    from tokenizers import AddedToken

    markers = [AddedToken(t, rstrip=True, special=True)
               for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")]
    return spm_tokenizer(specials=("<|endoftext|>", *markers), template=PHI3, eos_rstrip=True)


# Gemma: head_dim and query_pre_attn_scalar as llama.cpp assumes them, a sliding window shorter than the
# test texts (so that windowed layers differ from global ones), and for Gemma 3 six layers, the sixth global,
# with a global rope base apart from the local one.
GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 6, "tie": True}
ARCH_MODELS: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (chat_tokenizer, {}),
    "qwen2": (chat_tokenizer, {}),
    "mistral": (spm_tokenizer, {}),
    "qwen3": (qwen3_tokenizer, {"head_dim": 16}),
    "gemma2": (gemma_tokenizer, GEMMA),
    "gemma3_text": (gemma_tokenizer, {**GEMMA, "layers": 6, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}}),
    "phi3": (phi3_tokenizer, {}),
}


def build_arch(folder: Path, model_type: str, **overrides: Any) -> Path:
    """The tiny model of one supported architecture, with its family's tokenizer and chat template."""
    tokenizer, settings = ARCH_MODELS[model_type]
    return build(folder, tokenizer(), model_type, **{**settings, **overrides})
