"""The data pipeline on its own: validate, format, tokenize, count and show, without loading a model.

``ftcore prepare`` is a thin skin over :func:`prepare_data`; the rendering of an example
with its supervised tokens marked is shared with ``ftcore.testing``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ftcore import data as data_mod

MARK_OPEN, MARK_CLOSE = "[[", "]]"


@dataclass
class DataReport:
    """What :func:`prepare_data` returns: the validated config, the plugins, the tokenizer and the data."""

    config: Any
    plugins: Any
    tokenizer: Any
    data: data_mod.PreparedData
    added_tokens: list[str] = field(default_factory=list)

    @property
    def stats(self) -> data_mod.DataStats:
        return self.data.stats

    def examples(self, n: int) -> list[tuple[list[int], list[int]]]:
        """The first ``n`` training examples (in training order) as ``(input_ids, labels)``."""
        rows = self.data.train.select(range(min(n, len(self.data.train))))
        return [(list(r["input_ids"]), list(r["labels"])) for r in rows]


def prepare_data(source: Any = None, *, flags: dict[str, Any] | None = None, plugins: list[Any] | tuple = (),
                 log: Callable[[str], None] | None = None, **overrides: Any) -> DataReport:
    """Resolve the config and run the data path (tokenizer only, no model weights)."""
    from ftcore import config as cfg
    from ftcore import engine
    from ftcore._quiet import quiet_libraries
    from ftcore.models import resolve_model_path

    log = log or engine._default_log
    quiet_libraries()
    config, chosen = engine.resolve(source, cfg.merge(flags or {}, overrides), plugins, log)
    tokenizer = engine.load_tokenizer(resolve_model_path(config.model.path, log), config)
    added: list[str] = []
    for tokens in chosen.hook.ftcore_prepare_tokenizer(tokenizer=tokenizer, config=config):
        added += list(tokens or [])
    prepared = data_mod.prepare(config, chosen, tokenizer, log)
    return DataReport(config, chosen, tokenizer, prepared, added)


def segments(ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[str, bool]]:
    """Decode an example into ``[(text, supervised), ...]`` runs of consecutive tokens."""
    runs: list[tuple[list[int], bool]] = []
    for tok, lab in zip(ids, labels):
        sup = lab != data_mod.IGNORE_INDEX
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


STAT_ROWS = [
    ("records", "records read"), ("bad_records", "invalid records"), ("train_examples", "train examples"),
    ("eval_examples", "eval examples"), ("tokens", "tokens"), ("supervised_tokens", "supervised tokens"),
    ("truncated", "truncated (too long)"), ("dropped_too_long", "dropped (too long)"),
    ("dropped_unsupervised", "dropped (nothing supervised)"),
]


def summary_lines(report: DataReport) -> list[str]:
    s = report.stats
    lines = [f"{label:<30} {getattr(s, key)}" for key, label in STAT_ROWS]
    mode = "packed (padding-free)" if report.config.data.packing else "padded"
    lines.append(f"{'packing efficiency':<30} {s.packing_efficiency:.1%} ({mode}; padded batches of "
                 f"{report.config.training.batch_size}: {s.padded_efficiency:.1%})")
    for path, count in s.per_dataset.items():
        lines.append(f"{'  from ' + path:<30} {count} examples")
    if s.cached:
        lines.append("(tokenized data loaded from the cache)")
    return lines
