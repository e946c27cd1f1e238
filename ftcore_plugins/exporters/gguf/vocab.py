"""The tokenizer as llama.cpp wants it: token list, types, merges or scores, special ids, template.

Two families are supported, recognised from the fast tokenizer's own description
(``tokenizer.json``), never from a model name:

- byte-level BPE (GPT-2, Llama 3, Qwen2): ``tokenizer.ggml.model = "gpt2"`` with the merges and
  the name of the pre-tokenizer regex llama.cpp should use;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral): ``"llama"`` with per-token
  scores and types. llama.cpp merges the adjacent pair whose joined piece scores highest, so
  the score of a piece is minus the rank of the merge that creates it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ftcore import ConfigError
from ftcore_plugins.exporters.gguf.modelfile import turn_end_token

SPACE = "\u2581"   # SentencePiece's visible space
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

# Split regexes of the byte-level pre-tokenizers llama.cpp implements, by its name for them.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
KNOWN_SPLITS = {LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2", GPT2_PATTERN: "gpt-2"}


@dataclass
class Vocab:
    model: str                                   # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)   # bos, eos, unk, pad, eot
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    rstrip: dict[str, bool] = field(default_factory=dict)   # special token -> whether it eats the spaces after it

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def from_tokenizer(tokenizer: Any, n_vocab: int, where: str) -> Vocab:
    """Describe a transformers fast tokenizer for llama.cpp, padded to the model's ``n_vocab`` rows."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"gguf-export: {where}: the tokenizer is not a fast (tokenizers) tokenizer; "
                          f"GGUF export reads its tokenizer.json.")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"gguf-export: {where}: tokenizer model {model.get('type')!r} is not supported; "
                          f"GGUF export handles byte-level BPE and SentencePiece-style BPE with byte fallback.")
    if len(tokenizer) > n_vocab:
        raise ConfigError(f"gguf-export: {where}: the tokenizer has {len(tokenizer)} tokens but the model's "
                          f"embedding only {n_vocab} rows; resize the embeddings to the tokenizer.")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    if _has(spec.get("pre_tokenizer"), "ByteLevel"):
        vocab = Vocab(model="gpt2", tokens=[], types=[], pre=_byte_level_pre(spec, where), merges=merges)
    elif model.get("byte_fallback"):
        vocab = Vocab(model="llama", tokens=[], types=[], add_space_prefix=_prepends_space(spec))
    else:
        raise ConfigError(f"gguf-export: {where}: a BPE tokenizer that is neither byte-level nor "
                          f"SentencePiece-style (byte fallback) is not supported.")

    scores = _merge_scores(merges) if vocab.model == "llama" else {}
    floor = -float(len(merges) + 1)
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            vocab.tokens.append(f"[PAD{i}]")
            vocab.types.append(gguf.TokenType.UNUSED)
            if vocab.model == "llama":
                vocab.scores.append(floor)
            continue
        kind = _token_type(vocab.model, token, added.get(i), model.get("unk_token"))
        vocab.tokens.append(token)
        vocab.types.append(int(kind))
        if vocab.model == "llama":
            vocab.scores.append(scores.get(token, 0.0 if kind != gguf.TokenType.NORMAL else floor))

    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            vocab.special_ids[kind] = int(token_id)
    probe = tokenizer("a")["input_ids"]
    vocab.add_bos = bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    vocab.add_eos = bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    end = turn_end_token(tokenizer)
    if end is not None and tokenizer.convert_tokens_to_ids(end) != tokenizer.eos_token_id:
        vocab.special_ids["eot"] = int(tokenizer.convert_tokens_to_ids(end))   # llama.cpp stops there too
    vocab.rstrip = {a["content"]: bool(a.get("rstrip")) for a in added.values() if a.get("special")}
    template = getattr(tokenizer, "chat_template", None)
    vocab.chat_template = template if isinstance(template, str) else None
    return vocab


def _token_type(family: str, token: str, added: dict[str, Any] | None, unk: str | None) -> int:
    """llama.cpp's type for a token: control or user-defined when added; byte and unknown SentencePiece pieces."""
    import gguf

    if family == "llama" and token == unk:
        return gguf.TokenType.UNKNOWN
    if added is not None:
        return gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if family == "llama" and BYTE_TOKEN.match(token):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _has(node: Any, type_name: str) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == type_name:
        return True
    return any(_has(child, type_name) for child in node.get("pretokenizers") or node.get("normalizers") or [])


def _byte_level_pre(spec: dict[str, Any], where: str) -> str:
    """llama.cpp's name for the split regex this byte-level tokenizer uses."""
    pre = spec["pre_tokenizer"]
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    patterns = []
    for step in steps:
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            if step.get("add_prefix_space"):
                raise ConfigError(f"gguf-export: {where}: a byte-level tokenizer with add_prefix_space is not "
                                  f"supported by llama.cpp's tokenizer.")
            patterns.append(GPT2_PATTERN)
        elif step.get("type") == "Split":
            pattern = step.get("pattern") or {}
            patterns.append(pattern.get("Regex") or re.escape(pattern.get("String", "")))
        elif step.get("type") not in ("ByteLevel",):
            raise ConfigError(f"gguf-export: {where}: pre-tokenizer step {step.get('type')!r} has no "
                              f"llama.cpp equivalent.")
    names = [KNOWN_SPLITS.get(p) for p in patterns]
    if len(names) != 1 or names[0] is None:
        raise ConfigError(f"gguf-export: {where}: the byte-level pre-tokenizer's split pattern is not one "
                          f"llama.cpp knows (gpt-2, llama-bpe, qwen2); its tokenization would differ.")
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise ConfigError(f"gguf-export: {where}: normalizer {normalizer.get('type')!r} has no llama.cpp "
                          f"equivalent for a byte-level tokenizer.")
    return names[0]


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether text gets a leading visible space (Llama 2's Prepend normalizer or a Metaspace)."""
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers") if normalizer.get("type") == "Sequence" else [normalizer]
    if any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in steps if s):
        return True
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps if s)


def _merge_scores(merges: list[str]) -> dict[str, float]:
    """Score of each piece a merge creates: minus the rank of its first merge."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        scores.setdefault(left + right, -float(rank))
    return scores
