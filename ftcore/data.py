"""The data path: load -> validate -> format (plugin) -> tokenize with labels -> split -> batch.

A format plugin turns one raw record into an :class:`Example`: the text to train on and
the character spans that are supervised. Here that text is tokenized once with offsets,
and every token that overlaps a supervised span gets its id as label; all others get
-100. That makes masking exact at the token level whatever the tokenizer merges.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcore.errors import DataError, PluginError

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Example:
    """One rendered training example: ``text`` and the supervised character spans."""

    text: str
    supervised: list[tuple[int, int]] = field(default_factory=list)
    add_special_tokens: bool = False

    @classmethod
    def from_segments(cls, segments: list[tuple[str, bool]], add_special_tokens: bool = False) -> "Example":
        """Build from ``[(text, supervised), ...]`` pieces, joined in order."""
        text, spans, pos = [], [], 0
        for piece, train in segments:
            if train and piece:
                if spans and spans[-1][1] == pos:
                    spans[-1] = (spans[-1][0], pos + len(piece))
                else:
                    spans.append((pos, pos + len(piece)))
            text.append(piece)
            pos += len(piece)
        return cls("".join(text), spans, add_special_tokens)


@dataclass
class Problem:
    where: str           # "train.jsonl:12"
    field: str | None    # "messages[2].role" or None for the whole line
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field + ': ' if self.field else ''}{self.message}"


@dataclass
class DataStats:
    records: int = 0
    bad_records: int = 0
    examples: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_unsupervised: int = 0
    packing_efficiency: float = 1.0    # share of computed positions that are real tokens
    padded_efficiency: float = 1.0     # the same, were batches padded instead of packed
    cached: bool = False
    per_dataset: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- loading ---------------------------------------------------------------------

def expand_paths(path: str) -> list[Path]:
    """A file, a glob or a folder -> the data files it names (empty when none)."""
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        return sorted(Path(m) for m in glob.glob(str(p), recursive=True) if m.endswith(LOCAL_SUFFIXES))
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return [p]
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES
                      and not any(part.startswith(".") for part in f.relative_to(p).parts))
    return [p] if p.exists() else []


def iter_records(spec: Any) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` for one dataset spec; ``record`` is a Problem for an unreadable row."""
    files = expand_paths(spec.path)
    if not files:
        if _looks_like_local(spec.path):
            raise DataError(f"data file {spec.path} not found (no such file, folder or matching glob). "
                            f"Check the path in data.datasets / --data.")
        yield from _iter_hub_or_saved(spec)
        return
    for f in files:
        if f.is_dir():
            yield from _iter_saved(f, spec)
        elif f.suffix == ".jsonl":
            yield from _iter_jsonl(f)
        elif f.suffix == ".json":
            yield from _iter_json(f)
        else:
            yield from _iter_tabular(f)


def _looks_like_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith(LOCAL_SUFFIXES) or os.sep in path and not _is_hub_id(path)


def _is_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not Path(parts[0]).exists()


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")   # a BOM (Windows editors) is fine
            except UnicodeDecodeError as exc:
                yield where, Problem(where, None, f"not UTF-8 (bad byte at column {exc.start + 1}); "
                                     f"re-save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, Problem(where, None, f"malformed JSON at column {exc.colno}: {exc.msg}")


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON at column {exc.colno}: {exc.msg}. "
                        f"(A file of one JSON object per line should be named .jsonl.)") from None
    if isinstance(data, list):
        yield from zip(_array_item_lines(path, text), data)
        return
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        key, items = next(iter(data.items()))
        for i, rec in enumerate(items):
            yield f"{path}[{key}][{i}]", rec
        return
    raise DataError(f"{path}: expected a JSON array of records (or one object per line in a .jsonl file).")


def _array_item_lines(path: Path, text: str) -> list[str]:
    """``file:line`` of each element of a top-level JSON array (where the element starts)."""
    decoder, where = json.JSONDecoder(), []
    pos = text.index("[") + 1
    line, counted = 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return where
        line += text.count("\n", counted, pos)
        counted = pos
        where.append(f"{path}:{line}")
        _, pos = decoder.raw_decode(text, pos)


def _iter_tabular(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".csv":
        yield from _iter_csv(path)
        return
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's many parse errors
        raise DataError(f"{path}: could not be read as parquet: {exc}") from None
    for i, rec in enumerate(rows):
        yield f"{path}[row {i}]", rec


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    import csv

    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        start = 2   # line 1 is the header
        try:
            for rec in reader:
                yield f"{path}:{start}", _json_columns({k: v for k, v in rec.items() if k is not None})
                start = reader.line_num + 1
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 (bad byte near line {start}); re-save it as UTF-8.") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None


def _json_columns(rec: dict[str, Any]) -> dict[str, Any]:
    """CSV cells holding JSON lists/objects (e.g. messages) are decoded."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, str) and v[:1] in "[{":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def _iter_saved(path: Path, spec: Any) -> Iterator[tuple[str, Any]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise DataError(f"{path}: no split {spec.split!r}; it has {', '.join(ds)}.")
        ds = ds[spec.split]
    for i, rec in enumerate(ds):
        yield f"{path}[{spec.split} {i}]", rec


def _load_by_name(spec: Any) -> Any:
    import datasets

    try:
        return datasets.load_dataset(spec.path, spec.name, split=spec.split)
    except Exception as exc:  # offline, not found, ...
        raise DataError(f"dataset {spec.path!r} is neither a local file nor a loadable datasets-library "
                        f"dataset ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from None


def _iter_hub_or_saved(spec: Any) -> Iterator[tuple[str, Any]]:
    ds = _load_by_name(spec)
    for i, rec in enumerate(ds):
        yield f"{spec.path}[{spec.split} {i}]", rec


# -- tokenization ----------------------------------------------------------------

def tokenize(example: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Tokenize an Example; labels copy the ids of tokens overlapping a supervised span."""
    return tokenize_many([example], tokenizer)[0]


def tokenize_many(examples: list[Example], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """Tokenize several Examples in batched tokenizer calls (same result as one by one)."""
    out: list[Any] = [None] * len(examples)
    for flag in (False, True):
        picked = [i for i, ex in enumerate(examples) if bool(ex.add_special_tokens) == flag]
        if not picked:
            continue
        enc = tokenizer([examples[i].text for i in picked], add_special_tokens=flag, return_offsets_mapping=True)
        for j, i in enumerate(picked):
            out[i] = labels_from_offsets(enc["input_ids"][j], enc["offset_mapping"][j], examples[i].supervised)
    return out


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


def fit_length(ids: list[int], labels: list[int], max_length: int, too_long: str):
    """Apply the length policy; returns (ids, labels, action) where action is None/'truncated'/'dropped'."""
    if len(ids) <= max_length:
        return ids, labels, None
    if too_long == "drop":
        return None, None, "dropped"
    return ids[:max_length], labels[:max_length], "truncated"


# -- the pipeline ----------------------------------------------------------------

@dataclass
class PreparedData:
    train: Any                 # datasets.Dataset with input_ids, labels
    eval: Any | None
    stats: DataStats
    problems: list[Problem]


def resolve_format(spec: Any, format_plugins: list[str]) -> str:
    if spec.format:
        return spec.format
    if len(format_plugins) == 1:
        return format_plugins[0]
    if not format_plugins:
        raise DataError("no dataset format plugin is selected: add one to --plugins (e.g. alpaca or chatml).")
    raise DataError(f"dataset {spec.path} does not say its format and several format plugins are selected "
                    f"({' and '.join(format_plugins)}): set format: in its data.datasets entry.")


def prepare(config: Any, plugins: Any, tokenizer: Any, log: Any = print) -> PreparedData:
    """Run the whole data path for a validated config. Raises DataError on bad data.

    The result is cached (see :func:`cache_key`); a second call with the same data,
    tokenizer and format settings loads it instead of formatting and tokenizing again.
    """
    data_cfg = config.data
    if not data_cfg.datasets:
        raise DataError("no training data: pass --data FILE or set data.datasets in the config.")
    seed = data_cfg.seed if data_cfg.seed is not None else config.training.seed
    formats = plugins.names("format")
    for spec in [*data_cfg.datasets, *data_cfg.eval_datasets]:
        fmt = resolve_format(spec, formats)
        if fmt not in formats:
            raise DataError(f"dataset {spec.path} asks for format {fmt!r}, which is not a format plugin of this "
                            f"run (selected formats: {', '.join(formats) or 'none'}).")
    key = cache_key(config, plugins, tokenizer) if data_cfg.cache else None
    result = load_cached(key) if key else None
    if result is not None:
        result.stats.cached = True
        if result.stats.bad_records:
            log(f"warning: skipped {result.stats.bad_records} invalid records of {result.stats.records} "
                f"(data.on_bad_record: skip; cached data).")
    else:
        result = _prepare_uncached(config, plugins, tokenizer, formats, seed, log)
        if key:
            save_cached(key, result)
    lengths = example_lengths(result.train)
    result.stats.padded_efficiency = packing_efficiency(lengths, config.training.batch_size, False, seed)
    result.stats.packing_efficiency = 1.0 if data_cfg.packing else result.stats.padded_efficiency
    return result


def example_lengths(dataset: Any) -> list[int]:
    """Token count of each example, read from the Arrow column (no row-by-row decoding of the dataset)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def _prepare_uncached(config, plugins, tokenizer, formats, seed, log) -> PreparedData:
    data_cfg = config.data
    stats = DataStats()
    problems: list[Problem] = []
    train_rows = _collect(data_cfg.datasets, config, plugins, tokenizer, formats, stats, problems)
    eval_rows = (_collect(data_cfg.eval_datasets, config, plugins, tokenizer, formats, stats, problems)
                 if data_cfg.eval_datasets else None)
    _report_problems(problems, stats, data_cfg, log)
    rng = random.Random(seed)
    rng.shuffle(train_rows)
    if eval_rows is None:
        n_val = _val_count(data_cfg.val_size, len(train_rows))
        eval_rows, train_rows = train_rows[:n_val], train_rows[n_val:]
    elif not eval_rows:
        raise DataError("no evaluation examples are left in data.eval_datasets ("
                        + ", ".join(s.path for s in data_cfg.eval_datasets)
                        + ") after validation and length limits.")
    if not train_rows:
        raise DataError(f"no training examples are left: of {stats.records} records, {stats.bad_records} are invalid, "
                        f"{stats.dropped_too_long} were dropped as longer than data.max_length={data_cfg.max_length}, "
                        f"{stats.dropped_unsupervised} had nothing supervised left (e.g. truncation cut off the "
                        f"response), and {len(eval_rows or [])} went to validation. "
                        f"Add data, raise data.max_length or lower data.val_size.")
    stats.train_examples, stats.eval_examples = len(train_rows), len(eval_rows or [])
    return PreparedData(_to_dataset(train_rows), _to_dataset(eval_rows) if eval_rows else None, stats, problems)


def format_record(fmt: str, record: dict[str, Any], plugins: Any, tokenizer: Any, config: Any) -> Example:
    """Ask the format plugin ``fmt`` to render one valid record."""
    example = plugins.call_one(fmt, "ftcore_format_record", record=record, tokenizer=tokenizer, config=config)
    if not isinstance(example, Example):
        raise PluginError(f"format plugin {fmt!r} returned {type(example).__name__} from ftcore_format_record; "
                          f"it must return an ftcore.Example.")
    return example


def _collect(specs, config, plugins, tokenizer, formats, stats, problems) -> list[tuple[list[int], list[int]]]:
    rows: list[tuple[list[int], list[int]]] = []
    for spec in specs:
        fmt = resolve_format(spec, formats)
        before = len(rows)
        pending: list[Example] = []
        for where, record in iter_records(spec):
            stats.records += 1
            found = _check(where, record, fmt, plugins, config)
            if not found:
                try:
                    pending.append(format_record(fmt, record, plugins, tokenizer, config))
                except DataError as exc:   # a record the format cannot render (e.g. a template refuses it)
                    found = [Problem(where, None, str(exc))]
            if found:
                problems.extend(found)
                stats.bad_records += 1
            if len(pending) >= TOKENIZE_BATCH:
                _add_rows(pending, tokenizer, config.data, stats, rows)
                pending = []
        _add_rows(pending, tokenizer, config.data, stats, rows)
        stats.per_dataset[spec.path] = len(rows) - before
    return rows


TOKENIZE_BATCH = 1024   # examples per tokenizer call in prepare(); 1 tokenizes record by record


def _add_rows(examples: list[Example], tokenizer: Any, data_cfg: Any, stats: DataStats,
              rows: list[tuple[list[int], list[int]]]) -> None:
    """Tokenize, apply the length policy, count, and keep what teaches something."""
    for ids, labels in tokenize_many(examples, tokenizer) if examples else []:
        ids, labels, action = fit_length(ids, labels, data_cfg.max_length, data_cfg.too_long)
        if action == "dropped":
            stats.dropped_too_long += 1
            continue
        supervised = sum(1 for t in labels if t != IGNORE_INDEX)
        if supervised == 0:   # e.g. truncation cut off the whole response
            stats.dropped_unsupervised += 1
            continue
        stats.truncated += action == "truncated"
        stats.examples += 1
        stats.tokens += len(ids)
        stats.supervised_tokens += supervised
        rows.append((ids, labels))


def _check(where: str, record: Any, fmt: str, plugins: Any, config: Any) -> list[Problem]:
    if isinstance(record, Problem):
        return [record]
    if not isinstance(record, dict):
        return [Problem(where, None, f"expected a JSON object, got {type(record).__name__}")]
    found = plugins.call_one(fmt, "ftcore_validate_record", record=record, config=config) or []
    return [Problem(where, f, m) for f, m in found]


def _report_problems(problems: list[Problem], stats: DataStats, data_cfg: Any, log: Any) -> None:
    if stats.records == 0:
        raise DataError("the training data is empty: no records were found in "
                        + ", ".join(s.path for s in data_cfg.datasets) + ".")
    if not problems:
        return
    shown = "\n  ".join(str(p) for p in problems[: data_cfg.max_errors_shown])
    more = len(problems) - data_cfg.max_errors_shown
    tail = f"\n  ... and {more} more problems" if more > 0 else ""
    if stats.bad_records == stats.records:
        raise DataError(f"every record ({stats.records}) is invalid:\n  {shown}{tail}")
    if data_cfg.on_bad_record == "error":
        raise DataError(f"{stats.bad_records} of {stats.records} records are invalid:\n  {shown}{tail}\n"
                        f"Fix them, or set data.on_bad_record: skip to train without them.")
    log(f"warning: skipped {stats.bad_records} invalid records of {stats.records} "
        f"(data.on_bad_record: skip). First: {problems[0]}")


def _val_count(val_size: float, n: int) -> int:
    if val_size <= 0 or n < 2:
        return 0
    count = int(val_size) if val_size >= 1 else max(1, round(n * val_size))
    return min(count, n - 1)


def _to_dataset(rows: list[tuple[list[int], list[int]]]) -> Any:
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})


def packing_efficiency(lengths: list[int], batch_size: int, packing: bool, seed: int = 0) -> float:
    """Share of computed positions that are real tokens, for one epoch of random batches."""
    if packing or not lengths:
        return 1.0
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = computed = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i:i + batch_size]]
        real += sum(batch)
        computed += max(batch) * len(batch)
    return real / computed


# -- caching ---------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("FTCORE_CACHE", Path.home() / ".cache" / "ftcore"))


def cache_key(config: Any, plugins: Any, tokenizer: Any) -> str:
    """What the tokenized data depends on: the data (by content), the tokenizer, the format settings.

    Settings that only change how batches are built (batch size, packing) are not part of it.
    """
    h = hashlib.sha256()
    d = config.data
    for spec in [*d.datasets, *d.eval_datasets]:
        h.update(spec.model_dump_json().encode())
        files = expand_paths(spec.path)
        for f in files:
            h.update(f"{f.resolve()}:{content_digest(f)}".encode())
        if not files and not _looks_like_local(spec.path):   # a datasets-library name: its content fingerprint
            h.update(str(getattr(_load_by_name(spec), "_fingerprint", "")).encode())
    h.update(json.dumps([d.max_length, d.too_long, d.on_bad_record, d.val_size,
                         d.seed if d.seed is not None else config.training.seed]).encode())
    for name in plugins.names("format"):
        if name in config.sections:
            h.update(config.section(name).model_dump_json().encode())
        h.update(f"{name}:{plugins.infos[name].distribution}:{plugins.infos[name].version}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    from ftcore import __version__
    h.update(__version__.encode())
    return h.hexdigest()[:24]


def content_digest(path: Path) -> str:
    """A digest of a file's bytes (or of every file under a folder, e.g. a saved dataset)."""
    h = hashlib.blake2b(digest_size=16)
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Vocabulary, merges, added tokens, normalizer and post-processor, chat template, special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps([str(tokenizer.bos_token), str(tokenizer.eos_token), str(tokenizer.pad_token)]).encode())
    return h.hexdigest()


def load_cached(key: str) -> PreparedData | None:
    import datasets

    folder = cache_root() / "data" / key
    if not (folder / "stats.json").exists():
        return None
    try:
        stats = DataStats(**json.loads((folder / "stats.json").read_text()))
        train = datasets.load_from_disk(str(folder / "train"))
        ev = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").exists() else None
    except Exception:
        return None   # a damaged or outdated cache entry is rebuilt
    return PreparedData(train, ev, stats, [])


def save_cached(key: str, data: PreparedData) -> None:
    import shutil
    import tempfile

    root = cache_root() / "data"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        data.train.save_to_disk(str(tmp / "train"))
        if data.eval is not None:
            data.eval.save_to_disk(str(tmp / "eval"))
        (tmp / "stats.json").write_text(json.dumps(data.stats.as_dict()))
        final = root / key
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


# -- batching --------------------------------------------------------------------

class TokenCounter:
    """Counts real, supervised and computed (incl. padding) positions of the batches it builds."""

    def __init__(self) -> None:
        self.real = self.supervised = self.computed = 0


class PackedCollator:
    """Padding-free packing: the batch's examples become one row; position_ids restart per example.

    transformers turns restarting ``position_ids`` into a block-diagonal attention mask
    for every attention implementation (when no KV cache is used, hence ``use_cache=False``
    in the batch), so examples never attend to each other; the first label of each
    example is masked so no loss crosses a boundary.
    """

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        self.counter = TokenCounter()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        # transformers derives the block-diagonal mask from position_ids only without a KV cache;
        # a model loaded with use_cache on (e.g. in eval mode) would otherwise attend across examples.
        batch["use_cache"] = False
        n = int(batch["input_ids"].numel())
        self.counter.real += n
        self.counter.computed += n
        self.counter.supervised += int((batch["labels"] != IGNORE_INDEX).sum())
        return batch


class PaddedCollator:
    """Pads each batch to its longest example (right padding, labels -100, attention mask 0)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id
        self.counter = TokenCounter()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad] * (longest - n))
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * (longest - n))
            mask.append([1] * n + [0] * (longest - n))
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                 "attention_mask": torch.tensor(mask)}
        self.counter.real += int(batch["attention_mask"].sum())
        self.counter.computed += longest * len(features)
        self.counter.supervised += int((batch["labels"] != IGNORE_INDEX).sum())
        return batch


def supports_packing(model: Any) -> bool:
    """Whether a model takes ``position_ids`` (transformers then masks packed examples from each other)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "position_ids" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def make_collator(packing: bool, tokenizer: Any, model: Any = None,
                  log: Any = print) -> PackedCollator | PaddedCollator:
    """Padding-free packing by default; padded batches when asked, or when the model cannot take packing."""
    if packing and model is not None and not supports_packing(model):
        log(f"warning: {type(model).__name__} does not take position_ids, so examples cannot be packed without "
            f"attending to each other; padding batches instead (data.packing: false).")
        packing = False
    return PackedCollator() if packing else PaddedCollator(tokenizer.pad_token_id)
