"""Showing what is trained on: an example decoded with its supervised tokens marked (``ftcore prepare --show``)."""

from __future__ import annotations

from typing import Any

from ftcore.data.labels import IGNORE_INDEX

MARK_OPEN, MARK_CLOSE = "[[", "]]"


def segments(ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[str, bool]]:
    """Decode an example into ``[(text, supervised), ...]`` runs of consecutive tokens."""
    runs: list[tuple[list[int], bool]] = []
    for tok, lab in zip(ids, labels):
        sup = lab != IGNORE_INDEX
        if runs and runs[-1][1] == sup:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], sup))
    return [(tokenizer.decode(run, skip_special_tokens=False), sup) for run, sup in runs]


def render_marked(ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """Plain text with the supervised parts in ``[[...]]``."""
    return "".join(f"{MARK_OPEN}{text}{MARK_CLOSE}" if sup else text for text, sup in segments(ids, labels, tokenizer))


def render_rich(ids: list[int], labels: list[int], tokenizer: Any) -> Any:
    """A rich Text: supervised tokens bold green, masked ones dim."""
    from rich.text import Text

    out = Text()
    for text, sup in segments(ids, labels, tokenizer):
        out.append(text, style="bold green" if sup else "dim")
    return out
