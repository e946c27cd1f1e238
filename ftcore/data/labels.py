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
    batch = tokenize_batch(examples, tokenizer, max_chars)
    return [(ids.tolist(), labels.tolist()) for ids, labels in batch.rows()]


class TokenizedBatch:
    """Examples tokenized together, as flat arrays: ``ids`` and ``labels`` of every example one after another
    (int64), ``starts[i]:starts[i + 1]`` the tokens of example ``i``, ``supervised[i]`` its supervised tokens."""

    def __init__(self, ids: Any, labels: Any, lengths: Any) -> None:
        import numpy as np

        self.ids, self.labels = ids, labels
        self.starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.starts[1:])
        counted = np.zeros(len(labels) + 1, dtype=np.int64)
        np.cumsum(labels != IGNORE_INDEX, out=counted[1:])
        self.supervised = counted[self.starts[1:]] - counted[self.starts[:-1]]
        self._counted = counted

    def __len__(self) -> int:
        return len(self.starts) - 1

    def count_supervised(self, start: int, stop: int) -> int:
        """Supervised tokens among the flat positions ``start:stop``."""
        return int(self._counted[stop] - self._counted[start])

    def rows(self) -> list[tuple[Any, Any]]:
        return [(self.ids[a:b], self.labels[a:b]) for a, b in zip(self.starts[:-1], self.starts[1:])]


def transformers_encoder(tokenizer: Any) -> Any:
    """``encode(texts, add_special_tokens) -> (ids lists, offsets lists)`` through the tokenizer's own call."""
    def encode(texts: list[str], flag: bool) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        enc = tokenizer(texts, add_special_tokens=flag, return_offsets_mapping=True, return_attention_mask=False,
                        return_token_type_ids=False)
        return enc["input_ids"], enc["offset_mapping"]

    return encode


def backend_encoder(tokenizer: Any) -> Any:
    """An ``encode`` like ``transformers_encoder``'s that calls a fast tokenizer's Rust backend directly, which
    skips building transformers' per-text dictionaries (Python work that holds the interpreter's lock). For a
    tokenizer of one's own (it turns off the backend's truncation and padding, as transformers' call does): the
    first batch of each kind is encoded both ways, and where the two differ the tokenizer's own call is used."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fallback = transformers_encoder(tokenizer)
    if backend is None or not hasattr(backend, "encode_batch"):
        return fallback
    try:
        backend.no_truncation()
        backend.no_padding()
    except Exception:   # noqa: BLE001 - a backend without these: use the tokenizer's own call
        return fallback
    same: dict[bool, bool] = {}

    def encode(texts: list[str], flag: bool) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        if same.get(flag) is False:
            return fallback(texts, flag)
        encodings = backend.encode_batch(texts, add_special_tokens=flag)
        ids, offsets = [e.ids for e in encodings], [e.offsets for e in encodings]
        if flag not in same:
            expected = fallback(texts, flag)
            same[flag] = ids == list(expected[0]) and offsets == [list(o) for o in expected[1]]
            if not same[flag]:
                return expected
        return ids, offsets

    return encode


def tokenize_batch(examples: list[Example], tokenizer: Any, max_chars: int | None = None,
                   encode: Any = None) -> TokenizedBatch:
    """``tokenize_many`` as flat arrays (``TokenizedBatch``): one tokenizer call per value of
    ``add_special_tokens`` and the labels of the whole batch computed at once. ``encode``: how texts are
    encoded (``transformers_encoder`` of the tokenizer by default; see ``backend_encoder``)."""
    import numpy as np

    encode = encode or transformers_encoder(tokenizer)

    groups = []
    for flag in (False, True):
        picked = [i for i, ex in enumerate(examples) if bool(ex.add_special_tokens) == flag]
        if not picked:
            continue
        texts = [examples[i].text if max_chars is None or examples[i].split_long else examples[i].text[:max_chars]
                 for i in picked]
        ids_lists, offset_lists = encode(texts, flag)
        ids, labels, lengths = _flat_labels(ids_lists, offset_lists, [examples[i].supervised for i in picked],
                                            [len(t) for t in texts])
        groups.append((picked, ids, labels, lengths))
    if not groups:
        empty = np.zeros(0, dtype=np.int64)
        return TokenizedBatch(empty, empty, empty)
    if len(groups) == 1:
        return TokenizedBatch(*groups[0][1:])
    where: list[Any] = [None] * len(examples)   # both kinds in one batch: back into the examples' order
    for picked, ids, labels, lengths in groups:
        ends = np.cumsum(lengths)
        for i, a, b in zip(picked, ends - lengths, ends):
            where[i] = (ids[a:b], labels[a:b])
    return TokenizedBatch(np.concatenate([w[0] for w in where]), np.concatenate([w[1] for w in where]),
                          np.asarray([len(w[0]) for w in where], dtype=np.int64))


def _flat_labels(ids_lists: list[list[int]], offset_lists: list[list[tuple[int, int]]],
                 spans_lists: list[list[tuple[int, int]]], text_lengths: list[int]) -> tuple[Any, Any, Any]:
    """Labels of a batch at once: every text's characters are placed one after another (with a gap), so that
    one sorted search over all supervised spans finds, for every token, whether it overlaps one of its own
    text's spans (``labels_from_offsets`` for each text, in one pass)."""
    from itertools import chain

    import numpy as np

    lengths = np.fromiter(map(len, ids_lists), dtype=np.int64, count=len(ids_lists))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int64, count=total)
    off = np.fromiter(chain.from_iterable(chain.from_iterable(offset_lists)), dtype=np.int64,
                      count=2 * total).reshape(-1, 2)
    base = np.zeros(len(text_lengths), dtype=np.int64)
    np.cumsum(np.asarray(text_lengths, dtype=np.int64)[:-1] + 1, out=base[1:])
    shift = np.repeat(base, lengths)
    starts, ends = off[:, 0] + shift, off[:, 1] + shift
    merged: list[tuple[int, int]] = []
    for b, n, spans in zip(base.tolist(), text_lengths, spans_lists):
        last = len(merged)   # a text's spans, cut to its length (a text may be cut short), sorted and merged
        for s_start, s_end in (sorted(spans) if len(spans) > 1 else spans):
            s_start, s_end = min(s_start, n) + b, min(s_end, n) + b
            if len(merged) > last and s_start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], s_end))
            else:
                merged.append((s_start, s_end))
    if not merged:
        return ids, np.full(total, IGNORE_INDEX, dtype=np.int64), lengths
    span_starts, span_ends = np.asarray(merged, dtype=np.int64).T
    k = np.searchsorted(span_ends, starts, side="right")          # first span ending after the token starts
    hit = (ends > starts) & (k < len(merged)) & (span_starts[np.minimum(k, len(merged) - 1)] < ends)
    return ids, np.where(hit, ids, IGNORE_INDEX), lengths


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
