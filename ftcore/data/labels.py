"""Tokens and labels: a rendered ``Example`` is tokenized once with character offsets, and every token
that overlaps a supervised span gets its id as label; all others get -100. That makes masking
exact at the token level whatever the tokenizer merges.
"""

from __future__ import annotations

from typing import Any

from ftcore.types import Example

IGNORE_INDEX = -100


def tokenize(example: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Tokenize an Example; labels copy the ids of tokens overlapping a supervised span."""
    return tokenize_many([example], tokenizer)[0]


def tokenize_many(examples: list[Example], tokenizer: Any, max_chars: int | None = None
                  ) -> list[tuple[list[int], list[int]]]:
    """Tokenize several Examples in batched tokenizer calls (same result as one by one).

    ``max_chars``: tokenize only the first ``max_chars`` characters of a longer text (see
    ``char_limit``), so that memory and time follow the length kept, not the length given; an Example
    with ``split_long`` is tokenized whole (all of it is kept, in chunks).
    """
    out: list[Any] = [None] * len(examples)
    for flag in (False, True):
        picked = [i for i, ex in enumerate(examples) if bool(ex.add_special_tokens) == flag]
        if not picked:
            continue
        texts = [examples[i].text if max_chars is None or examples[i].split_long else examples[i].text[:max_chars]
                 for i in picked]
        enc = tokenizer(texts, add_special_tokens=flag, return_offsets_mapping=True)
        for j, i in enumerate(picked):
            out[i] = labels_from_offsets(enc["input_ids"][j], enc["offset_mapping"][j], examples[i].supervised)
    return out


def char_limit(tokenizer: Any, max_length: int) -> int:
    """Characters enough for more than ``max_length`` tokens whatever the text: the longest token's length
    (in characters of its vocabulary entry, which never has fewer than the text it stands for) times
    ``max_length``, plus one. A text cut there still tokenizes to more than ``max_length`` tokens, so
    cutting it changes nothing that the length policy keeps."""
    longest = getattr(tokenizer, "_ftcore_longest_token", None)
    if longest is None:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        tokenizer._ftcore_longest_token = longest
    return max(longest, 1) * max_length + 1


def labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]],
                        spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """A token is supervised when its characters overlap a supervised span (empty tokens never are)."""
    import numpy as np

    merged: list[list[int]] = []
    for s_start, s_end in sorted(spans):
        if merged and s_start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s_end)
        else:
            merged.append([s_start, s_end])
    ids = list(ids)
    if not merged or not ids:
        return ids, [IGNORE_INDEX] * len(ids)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = off[:, 0], off[:, 1]
    span_starts, span_ends = np.asarray(merged, dtype=np.int64).T
    k = np.searchsorted(span_ends, starts, side="right")          # first span ending after the token starts
    hit = (ends > starts) & (k < len(merged)) & (span_starts[np.minimum(k, len(merged) - 1)] < ends)
    return ids, np.where(hit, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()


def split_chunks(ids: list[int], labels: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Consecutive chunks of at most ``max_length`` tokens; a last chunk of one token (which predicts nothing
    once labels are shifted) is left out."""
    chunks = [(ids[i:i + max_length], labels[i:i + max_length]) for i in range(0, len(ids), max_length)]
    return [c for c in chunks if len(c[0]) > 1 or len(chunks) == 1]


def fit_length(ids: list[int], labels: list[int], max_length: int, too_long: str):
    """Apply the length policy; returns (ids, labels, action) where action is None/'truncated'/'dropped'."""
    if len(ids) <= max_length:
        return ids, labels, None
    if too_long == "drop":
        return None, None, "dropped"
    return ids[:max_length], labels[:max_length], "truncated"
