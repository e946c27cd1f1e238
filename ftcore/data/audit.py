"""The data-quality audit of ``prepare``: what is wrong with a dataset before training starts.

Per example (as the pipeline tokenizes it): answers that are empty or whitespace only, examples with nothing
supervised, answers cut by truncation (partly, or wholly so that the example is dropped), its token length and
supervised share. Over the whole data: exact duplicates (a hash of the record's normalised text), near
duplicates (MinHash over word 3-grams with LSH bands, verified against ``near_duplicate_threshold``), the same
two between the training and the held-out examples (leakage), length outliers beyond a robust threshold
(third quartile plus three interquartile ranges, and at least twice the median), and the distributions of
length and supervised share.

Memory is bounded by a few numbers per example (a 64 x 16-bit MinHash signature, an 8-byte hash, a length, a
share and where it came from); the work is linear in the examples but for one sort per LSH band. The result is
a JSON-able summary (``DataStats.audit``) with counts and the first ``LINES_KEPT`` findings of each kind, named
by ``file:line``, so it survives the cache.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Any

from ftcore.errors import DataError

NUM_PERM = 64          # MinHash functions
BANDS, ROWS = 16, 4    # LSH: 16 bands of 4 16-bit values (one uint64 per band); candidates are verified
SHINGLE = 3            # words per shingle
LINES_KEPT = 20        # findings of each kind kept (with file:line) in the summary
VERIFY_CHUNK = 65536   # candidate pairs compared at once
SIGNATURE_CHARS = 1 << 16   # near duplicates are judged on a record's first 65,536 characters
BATCH_CHARS = 1 << 21       # characters signed at once (bounds the batch's working memory, ~100 MB)

CHECKS = {   # finding -> how the audit names it (prepare's table, the report)
    "exact_duplicates": "exact duplicates in the training data",
    "near_duplicates": "near duplicates in the training data",
    "leakage_exact": "held-out examples also in the training data (exact)",
    "leakage_near": "held-out examples near a training example",
    "empty_answers": "empty or whitespace-only answers",
    "unsupervised": "nothing supervised (dropped)",
    "cut_before_answer": "answer cut off by truncation (dropped)",
    "answer_cut": "answer partly cut by truncation",
    "length_outliers": "length outliers",
}


def record_text(record: Any) -> str:
    """The text of a record for duplicate checks: its values (not its keys), in order, lower-cased, with
    whitespace collapsed."""
    values = list(record.values()) if isinstance(record, dict) else None
    if values is not None and all(isinstance(v, str) for v in values):   # the common flat record
        return " ".join(" ".join(values).lower().split())
    parts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif value is not None:
            parts.append(str(value))

    walk(record)
    return " ".join(" ".join(parts).lower().split())


def _params() -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.RandomState(20240516)
    a = rng.randint(0, 2 ** 31, size=NUM_PERM).astype(np.uint32) * np.uint32(2) + np.uint32(1)   # odd
    b = rng.randint(0, 2 ** 31, size=NUM_PERM).astype(np.uint32)
    return a, b


_A, _B = None, None


def signatures(texts: list[str]) -> Any:
    """MinHash signatures (``len(texts) x NUM_PERM`` uint16) of normalised texts (``record_text``: single
    spaces, no newlines) over word 3-grams; a text without words gets all-ones (it is only ever an exact
    duplicate). Vectorised over the batch: words are hashed from the bytes with a polynomial hash, each shingle
    to 32 bits, and the permutations are 32-bit multiply-shift hashes (the top 16 bits of ``a * x + b``, ``a``
    odd): half the memory traffic of 64-bit ones, for 16-bit values either way."""
    import numpy as np

    global _A, _B
    if _A is None:
        _A, _B = _params()
    n = len(texts)
    sig = np.full((n, NUM_PERM), 0xFFFF, dtype=np.uint16)
    w, owners = _word_hashes(texts)
    if not len(w):
        return sig
    u = np.uint64
    with np.errstate(over="ignore"):
        # shingle j of a text: words j, j+1, j+2 (a fixed filler past the text's end), one per word
        sh = w.copy()
        for k in range(1, SHINGLE):
            nxt = np.full(len(w), u(0x9E3779B97F4A7C15), dtype=u)
            same = owners[k:] == owners[:-k]
            nxt[:-k][same] = w[k:][same]
            sh = _mix64(sh * u(0xBF58476D1CE4E5B9) + nxt)
        key = (sh >> u(32)).astype(np.uint32)
        step = max(1, 4_000_000 // NUM_PERM)   # bound the shingle x permutation matrix
        mins = np.full((n, NUM_PERM), 0xFFFFFFFF, dtype=np.uint32)
        for lo in range(0, len(key), step):   # permutations x shingles: each row's segments are contiguous
            _min_into(mins, owners[lo:lo + step], _A[:, None] * key[None, lo:lo + step] + _B[:, None])
    has = np.bincount(owners, minlength=n) > 0
    sig[has] = (mins[has] >> np.uint32(16)).astype(np.uint16)   # the top 16 bits of the least is the least of them
    return sig


_P = 0x100000001B3                      # odd: invertible modulo 2**64
_P_INV = pow(_P, -1, 2 ** 64)


def _word_hashes(texts: list[str]) -> tuple[Any, Any]:
    """Each word's 64-bit hash and the index of its text, for space-separated texts (in order)."""
    import numpy as np

    u = np.uint64
    b = np.frombuffer("\n".join(texts).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    if not len(b):
        return np.zeros(0, u), np.zeros(0, np.int64)
    sep = np.flatnonzero((b == 32) | (b == 10))
    starts = np.concatenate(([0], sep + 1))
    ends = np.concatenate((sep, [len(b)]))
    newline_before = np.concatenate(([0], np.cumsum(b == 10)))   # texts ended before each byte position
    owners = newline_before[starts]
    keep = ends > starts
    starts, ends, owners = starts[keep], ends[keep], owners[keep].astype(np.int64)
    with np.errstate(over="ignore"):
        pw = np.cumprod(np.full(len(b), _P, dtype=u))
        pw = np.concatenate(([u(1)], pw[:-1]))                      # P**j
        inv = np.cumprod(np.full(len(b), _P_INV, dtype=u))
        inv = np.concatenate(([u(1)], inv[:-1]))                    # P**-j
        prefix = np.concatenate(([u(0)], np.cumsum((b.astype(u) + u(1)) * pw, dtype=u)))
        h = (prefix[ends] - prefix[starts]) * inv[starts]           # the word's bytes hashed from its start
        h = _mix64(h + (ends - starts).astype(u))
    return h, owners


def _mix64(x: Any) -> Any:
    """splitmix64's finaliser (wrapping uint64 arithmetic)."""
    import numpy as np

    u = np.uint64
    x = (x ^ (x >> u(30))) * u(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> u(27))) * u(0x94D049BB133111EB)
    return x ^ (x >> u(31))


def _min_into(mins: Any, owners: Any, h: Any) -> None:
    """``mins[owner] = min(mins[owner], columns of h)`` (``h``: one row per permutation, one column per
    shingle); owners are sorted, so a segmented reduce along each row does it (along rows, not down columns:
    contiguous memory, several times faster)."""
    import numpy as np

    if not len(owners):
        return
    cut = np.flatnonzero(np.diff(owners)) + 1
    first = np.concatenate(([0], cut))
    seg = np.minimum.reduceat(h, first, axis=1)
    rows = owners[first]
    mins[rows] = np.minimum(mins[rows], seg.T)


def exact_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little",
                          signed=True)


class Audit:
    """Collects what the checks need, example by example, and summarises once the split is known."""

    def __init__(self, near: bool = True, threshold: float = 0.8, special_tokens: list[str] | None = None,
                 max_length: int | None = None) -> None:
        import numpy as np

        self.np = np
        self.near, self.threshold, self.max_length = near, threshold, max_length
        self.special = sorted({t for t in (special_tokens or []) if t}, key=len, reverse=True)
        self._blank: Any = None
        self.where: list[str] = []                 # per kept example, in the pipeline's order
        self._hashes = array("q")                  # compact columns: 8 + 4 + 4 bytes per example
        self._sigs: list[Any] = []
        self._lengths = array("i")
        self._supervised = array("i")
        self._texts: list[str] = []                # a batch waiting for its signatures
        self._chars = 0
        self.findings: dict[str, list[str]] = {name: [] for name in CHECKS}
        self.counts: dict[str, int] = {name: 0 for name in CHECKS}

    # -- per example ----------------------------------------------------------------------
    def note(self, name: str, where: str, detail: str = "") -> None:
        self.counts[name] += 1
        if len(self.findings[name]) < LINES_KEPT:
            self.findings[name].append(f"{where}{': ' + detail if detail else ''}")

    def empty_answer(self, example: Any) -> bool:
        """Whether the example's supervised text is empty or whitespace once special tokens are taken out."""
        if not example.supervised:
            return False
        answer = "".join(example.text[s:e] for s, e in example.supervised)
        if self._blank is None:   # whitespace and special tokens only (fails at an answer's first word)
            import re

            self._blank = re.compile("(?:" + "|".join([r"\s", *map(re.escape, self.special)]) + ")*")
        return self._blank.fullmatch(answer) is not None

    def add(self, where: str, text: str, length: int = 0, supervised: int = 0) -> None:
        """A kept example: its record's normalised text (``record_text``), token length and supervised tokens."""
        self.where.append(where)
        self._hashes.append(exact_hash(text))
        self._lengths.append(length)
        self._supervised.append(supervised)
        if self.near:
            text = text[:SIGNATURE_CHARS]
            self._texts.append(text)
            self._chars += len(text)
            if len(self._texts) >= 2048 or self._chars >= BATCH_CHARS:
                self._flush()

    def _flush(self) -> None:
        if self._texts:
            self._sigs.append(signatures(self._texts))
        self._texts, self._chars = [], 0

    # -- over the data --------------------------------------------------------------------
    def summary(self, train_idx: list[int], eval_idx: list[int], tokens: bool = True) -> dict[str, Any]:
        """The audit's findings, given which examples (by the order they were added) train and which are held
        out. ``tokens``: the examples carry lengths and supervised counts (the supervised path)."""
        np = self.np
        self._flush()
        train = np.asarray(sorted(train_idx), dtype=np.int64)
        held = np.asarray(sorted(eval_idx), dtype=np.int64)
        hashes = np.frombuffer(self._hashes, dtype=np.int64) if len(self._hashes) else np.zeros(0, np.int64)
        self._exact(hashes, train, held)
        if self.near and self._sigs:
            sig = np.concatenate(self._sigs)
            self._near(sig, hashes, train, held)
        out: dict[str, Any] = {"examples": len(self.where), "train_examples": len(train),
                               "eval_examples": len(held),
                               "near_duplicate_threshold": self.threshold if self.near else None}
        if tokens and len(self._lengths):
            lengths = np.frombuffer(self._lengths, dtype=np.int32).astype(np.int64)
            sup = np.frombuffer(self._supervised, dtype=np.int32).astype(np.float64)
            share = sup / np.maximum(lengths, 1)
            out["length"] = _quartiles(lengths)
            out["supervised_share"] = _quartiles(share, 3)
            q1, med, q3 = np.percentile(lengths, [25, 50, 75])
            limit = max(q3 + 3 * (q3 - q1), 2 * med)
            out["length_outlier_above"] = int(limit)
            if len(lengths) >= 8:
                for i in np.flatnonzero(lengths > limit):
                    self.note("length_outliers", self.where[i], f"{lengths[i]} tokens (median {med:.0f})")
        n_train = max(len(train), 1)
        out["duplicate_share"] = round((self.counts["exact_duplicates"] + self.counts["near_duplicates"])
                                       / n_train, 4)
        out["findings"] = {name: {"count": self.counts[name], "lines": self.findings[name]}
                           for name in CHECKS if self.counts[name]}
        return out

    def _exact(self, hashes: Any, train: Any, held: Any) -> None:
        np = self.np
        if len(train):
            h = hashes[train]
            order = np.argsort(h, kind="stable")
            hs = h[order]
            same = np.flatnonzero(hs[1:] == hs[:-1]) + 1
            first = _group_first(hs)
            for j in sorted(same, key=lambda j: train[order[j]]):   # in file order, each with its group's first
                self.note("exact_duplicates", self.where[train[order[j]]],
                          f"same as {self.where[train[order[first[j]]]]}")
        if len(held) and len(train):
            seen = {}
            for i in train:
                seen.setdefault(int(hashes[i]), int(i))
            for i in held:
                j = seen.get(int(hashes[i]))
                if j is not None:
                    self.note("leakage_exact", self.where[i], f"held out, but also in training at {self.where[j]}")

    def _near(self, sig: Any, hashes: Any, train: Any, held: Any) -> None:
        np = self.np
        # within training: one example per exact hash (exact duplicates are counted already), words only
        if len(train):
            _, firsts = np.unique(hashes[train], return_index=True)
            uniq = np.sort(train[firsts])
            uniq = uniq[(sig[uniq] != 0xFFFF).any(axis=1)]
            pairs = self._candidates(sig, uniq, np.zeros(len(uniq), dtype=bool))
            dup_of: dict[int, int] = {}
            for a, b in pairs:   # a: later example, b: the earlier one it repeats
                if a not in dup_of:
                    dup_of[a] = b
            for a in sorted(dup_of):
                self.note("near_duplicates", self.where[a], f"near {self.where[dup_of[a]]}")
        if len(held) and len(train):
            exact_leaks = set(hashes[train].tolist())
            held_new = np.asarray([i for i in held if int(hashes[i]) not in exact_leaks], dtype=np.int64)
            if len(held_new):
                both = np.concatenate([train, held_new])
                is_eval = np.concatenate([np.zeros(len(train), bool), np.ones(len(held_new), bool)])
                keep = (sig[both] != 0xFFFF).any(axis=1)
                leak: dict[int, int] = {}
                for a, b in self._candidates(sig, both[keep], is_eval[keep]):
                    leak.setdefault(a, b)
                for a in sorted(leak):
                    self.note("leakage_near", self.where[a], f"held out, but near training {self.where[leak[a]]}")

    def _candidates(self, sig: Any, idx: Any, is_eval: Any) -> list[tuple[int, int]]:
        """Verified pairs ``(a, b)``: ``a`` near ``b``, where ``b`` comes first in its LSH bucket (a training
        example when ``is_eval`` marks held-out ones, and then ``a`` is held out)."""
        np = self.np
        if len(idx) < 2:
            return []
        bands = np.ascontiguousarray(sig[idx]).view(np.uint64)   # BANDS uint64 per example
        found_a, found_b = [], []
        for band in range(BANDS):
            keys = bands[:, band]
            order = np.lexsort((is_eval, keys))   # by key, training examples first in each bucket
            ks = keys[order]
            first = _group_first(ks)
            cand = np.flatnonzero(first != np.arange(len(ks)))
            rep, other = order[first[cand]], order[cand]
            if is_eval.any():
                ok = is_eval[other] & ~is_eval[rep]
            else:
                ok = np.ones(len(cand), bool)
            found_a.append(idx[other[ok]])
            found_b.append(idx[rep[ok]])
        a = np.concatenate(found_a)
        b = np.concatenate(found_b)
        if not len(a):
            return []
        pair = np.unique(np.stack([a, b], axis=1), axis=0)
        keep = []
        for lo in range(0, len(pair), VERIFY_CHUNK):
            p = pair[lo:lo + VERIFY_CHUNK]
            sim = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
            keep.append(p[sim >= self.threshold])
        pair = np.concatenate(keep)
        pair = pair[np.lexsort((pair[:, 1], pair[:, 0]))]   # each a with its earliest b
        return [(int(x), int(y)) for x, y in pair]


def _group_first(sorted_keys: Any) -> Any:
    """For each position of sorted keys, the position where its run of equal keys starts."""
    import numpy as np

    n = len(sorted_keys)
    start = np.zeros(n, dtype=np.int64)
    if n > 1:
        new = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
        start[new] = new
    return np.maximum.accumulate(start)


def _quartiles(values: Any, digits: int = 1) -> dict[str, float]:
    import numpy as np

    if not len(values):
        return {}
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return {k: round(float(v), digits) for k, v in zip(("min", "q1", "median", "q3", "max"), q)}


def describe(audit: dict[str, Any]) -> list[tuple[str, int, list[str]]]:
    """``(check, count, first lines)`` of an audit summary, in the order of ``CHECKS``."""
    found = audit.get("findings") or {}
    return [(label, found[name]["count"], found[name]["lines"]) for name, label in CHECKS.items() if name in found]


def apply_audit_policy(audit: dict[str, Any], settings: Any, log: Any) -> None:
    """Leakage and heavy duplication: a warning naming the lines, or (``on_leakage`` / ``on_duplicates``:
    error) a DataError before training. Applied to fresh and cached findings alike."""
    if not audit or not settings.enabled:
        return
    found = audit.get("findings") or {}
    _enforce(found, ("leakage_exact", "leakage_near"), settings.on_leakage, "on_leakage", log, lambda count: (
        f"{count} of {audit.get('eval_examples')} held-out examples are (near) copies of training examples, so "
        f"the eval loss overstates what the model learned:"),
        "\nRemove them from one side (with data.val_size, deduplicate the data).")
    share = audit.get("duplicate_share", 0.0)
    if share > settings.max_duplicate_share:
        _enforce(found, ("exact_duplicates", "near_duplicates"), settings.on_duplicates, "on_duplicates", log,
                 lambda count: (f"{count} training examples ({share:.1%}, above data.audit.max_duplicate_share="
                                f"{settings.max_duplicate_share:.0%}) repeat another one:"),
                 "\nDeduplicate the data (or, to weight a dataset on purpose, use its weight setting).")


def _enforce(found: dict[str, Any], names: tuple[str, ...], policy: str, option: str, log: Any,
             headline: Any, advice: str) -> None:
    """One policy: the findings ``names`` (with their lines) as a warning, or a DataError when ``policy`` is
    error."""
    hits = [found[n] for n in names if n in found]
    if not hits:
        return
    count = sum(f["count"] for f in hits)
    text = headline(count) + _lines([line for f in hits for line in f["lines"]], count) + advice
    if policy == "error":
        raise DataError(text + f" (data.audit.{option}: error; set it to warn to train anyway)")
    log("warning: " + text)


def _lines(lines: list[str], count: int, shown: int = 5) -> str:
    more = f"\n  ... and {count - shown} more" if count > shown else ""
    return "".join(f"\n  {line}" for line in lines[:shown]) + more


def mixture_lines(mixture: list[dict[str, Any]]) -> list[str]:
    """The mix of training datasets: records read, examples kept, training examples sampled (by weight) and
    their share of the training tokens."""
    lines = ["mixture (per training dataset): records read -> examples kept -> sampled for training "
             "(weight, cap), share of training tokens"]
    for m in mixture:
        cap = f", max_records {m['max_records']}" if m.get("max_records") else ""
        lines.append(f"  {m['path']} ({m.get('format') or 'run format'}): {m['records']} -> {m['examples']} -> "
                     f"{m['train_examples']} (weight {m['weight']:g}{cap}), {m['token_share']:.1%} of tokens")
    return lines


def audit_lines(audit: dict[str, Any], shown: int = 5) -> list[str]:
    """The data-quality audit as text lines: each finding with its count and first lines (``file:line``), then
    the distributions of length and supervised share."""
    if not audit:
        return []
    found = describe(audit)
    lines = [f"data audit ({audit.get('examples', 0)} examples checked): "
             + ("no problems found" if not found else ", ".join(f"{count} {label}" for label, count, _ in found))]
    for label, count, where in found:
        lines.append(f"  {label}: {count}")
        lines += [f"    {w}" for w in where[:shown]]
        if count > shown:
            lines.append(f"    ... and {count - shown} more")
    if audit.get("length"):
        q = audit["length"]
        lines.append(f"  length in tokens: min {q['min']:g}, quartiles {q['q1']:g} / {q['median']:g} / "
                     f"{q['q3']:g}, max {q['max']:g} (outliers above {audit.get('length_outlier_above')})")
    if audit.get("supervised_share"):
        q = audit["supervised_share"]
        lines.append(f"  supervised share per example: min {q['min']:.1%}, quartiles {q['q1']:.1%} / "
                     f"{q['median']:.1%} / {q['q3']:.1%}, max {q['max']:.1%}")
    return lines


def audit_brief(audit: dict[str, Any]) -> str:
    """One line: the count of each finding ("no problems found" when there are none)."""
    found = describe(audit)
    return "; ".join(f"{count} {label}" for label, count, _ in found) or "no problems found"
