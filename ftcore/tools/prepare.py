"""The data pipeline on its own (``ftcore prepare``): validate, format, tokenize and count, without loading a
model. Showing an example with its supervised tokens marked is ``ftcore.data.show``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcore import runfolder
from ftcore.config.layering import deep_merge
from ftcore.data.audit import mixture_lines
from ftcore.data.labels import IGNORE_INDEX
from ftcore.data.pipeline import prepare
from ftcore.data.prepared import DataStats, PreparedData
from ftcore.errors import ConfigError
from ftcore.models.paths import resolve_model_path
from ftcore.models.tokenizer import load_tokenizer
from ftcore.quiet import quiet_libraries
from ftcore.registry.resolution import resolve
from ftcore.training.chain import is_run_model
from ftcore.types import RunContext


@dataclass
class DataReport:
    """What :func:`prepare_data` returns: the validated config, the plugins, the tokenizer and the data."""

    config: Any
    plugins: Any
    tokenizer: Any
    data: PreparedData
    added_tokens: list[str] = field(default_factory=list)

    @property
    def stats(self) -> DataStats:
        return self.data.stats

    def examples(self, n: int) -> list[tuple[list[int], list[int]]]:
        """The first ``n`` training examples (in training order) as ``(input_ids, labels)``; a preference record
        gives one per answer (the prompt masked, the scored answer as labels)."""
        return [(ids, labels) for _, ids, labels in self.shown(n)]

    def shown(self, n: int) -> list[tuple[str, list[int], list[int]]]:
        """``(title, input_ids, labels)`` of the first ``n`` training records: "example 3" for a supervised
        example; "pair 3, chosen" and "pair 3, rejected" for a DPO pair; "example 3, desirable" for KTO."""
        out = []
        for k, r in enumerate(self.data.train.select(range(min(n, len(self.data.train)))), start=1):
            if "prompt_ids" not in r:
                out.append((f"example {k}", list(r["input_ids"]), list(r["labels"])))
                continue
            prompt = list(r["prompt_ids"])
            if "chosen_ids" in r:
                answers = [(f"pair {k}, chosen", r["chosen_ids"]), (f"pair {k}, rejected", r["rejected_ids"])]
            else:
                answers = [(f"example {k}, {'desirable' if r['label'] else 'undesirable'}", r["completion_ids"])]
            out += [(title, prompt + list(ids), [IGNORE_INDEX] * len(prompt) + list(ids)) for title, ids in answers]
        return out


def prepare_data(source: Any = None, *, flags: dict[str, Any] | None = None, plugins: list[Any] | tuple = (),
                 log: Callable[[str], None] | None = None, **overrides: Any) -> DataReport:
    """Resolve the config and run the data path (tokenizer only, no model weights)."""
    log = log or _stderr
    quiet_libraries()
    config, chosen = resolve(source, deep_merge(flags or {}, overrides), plugins, log)
    if is_run_model(config.model.path):   # a finished run: the tokenizer it saved with its adapter or model
        model_path = runfolder.saved_model_dir(Path(config.model.path).expanduser())
        if model_path is None:
            raise ConfigError(f"model {config.model.path} is an ftcore run that has not finished (no adapter/ or "
                              f"model/ folder): finish it (the same command with --resume auto), or use another model.")
    else:
        model_path = resolve_model_path(config.model.path, log, revision=config.model.revision,
                                        trust_remote_code=config.model.trust_remote_code, weights=False)
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    ctx = RunContext(config=config, plugins=chosen, output_dir=Path(config.output_dir), log=log,
                     model_path=model_path, tokenizer=tokenizer)
    for tokens in chosen.hook.ftcore_prepare_tokenizer(tokenizer=tokenizer, config=config, ctx=ctx):
        ctx.added_tokens += list(tokens or [])
    prepared = chosen.hook.ftcore_prepare_data(config=config, tokenizer=tokenizer, ctx=ctx)   # an objective's own
    if prepared is None:
        prepared = prepare(config, chosen, tokenizer, log, ctx)
    return DataReport(config, chosen, tokenizer, prepared, ctx.added_tokens)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


STAT_ROWS = [
    ("records", "records read"), ("bad_records", "invalid records"), ("train_examples", "train examples"),
    ("eval_examples", "eval examples"), ("tokens", "tokens"), ("supervised_tokens", "supervised tokens"),
    ("truncated", "truncated (too long)"), ("dropped_too_long", "dropped (too long)"),
    ("dropped_unsupervised", "dropped (nothing supervised)"),
]


def summary_lines(report: DataReport) -> list[str]:
    s = report.stats
    lines = [f"{label:<30} {getattr(s, key)}" for key, label in STAT_ROWS]
    if s.split_documents:   # the text format's long documents
        lines.append(f"{'split into chunks (too long)':<30} {s.split_documents}")
    mode = "packed (padding-free)" if report.config.data.packing else "padded"
    lines.append(f"{'packing efficiency':<30} {s.packing_efficiency:.1%} ({mode}; padded batches of "
                 f"{report.config.training.batch_size}: {s.padded_efficiency:.1%})")
    if s.mixture and (len(s.mixture) > 1 or any(m["weight"] != 1 or m["max_records"] for m in s.mixture)):
        lines += mixture_lines(s.mixture)
    else:
        for path, count in s.per_dataset.items():
            lines.append(f"{'  from ' + path:<30} {count} examples")
    for key, value in s.preference.items():   # a preference objective's pair statistics
        lines.append(f"{key.replace('_', ' '):<30} {value}")
    if s.cached:
        lines.append("(tokenized data loaded from the cache)")
    return lines
