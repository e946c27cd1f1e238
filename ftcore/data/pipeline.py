"""The data path for a run: load -> validate -> format (plugin) -> tokenize with labels -> split.

A format plugin turns one raw record into an ``Example`` (``ftcore_format_record``); ``labels``
tokenizes it with exact masks; here records are counted, checked against the length policy,
shuffled and split into training and held-out sets, and the result is cached (``cache``).
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path
from typing import Any

from ftcore.config.checks import check_dataset_formats, resolve_format
from ftcore.data.audit import Audit, apply_audit_policy, record_text
from ftcore.data.cache import cache_key, load_cached, save_cached
from ftcore.data.labels import TokenizedBatch, backend_encoder, char_limit, tokenize_batch
from ftcore.data.prepared import DataStats, PreparedData
from ftcore.data.records import Problem, iter_records
from ftcore.errors import DataError, PluginError
from ftcore.files import cache_root
from ftcore.types import Example, RunContext


def prepare(config: Any, plugins: Any, tokenizer: Any, log: Any = print, ctx: RunContext | None = None
            ) -> PreparedData:
    """Run the whole data path for a validated config. Raises DataError on bad data.

    The result is cached (see ``cache.cache_key``); a second call with the same data,
    tokenizer and format settings loads it instead of formatting and tokenizing again.
    ``ctx`` is what the format hooks get (a run's context; by default one made for this call).
    """
    if ctx is None:
        ctx = RunContext(config=config, plugins=plugins, output_dir=Path(config.output_dir), log=log,
                         tokenizer=tokenizer)
    data_cfg = config.data
    if not data_cfg.datasets:
        raise DataError("no training data: pass --data FILE or set data.datasets in the config.")
    seed = data_cfg.seed if data_cfg.seed is not None else config.training.seed
    formats = plugins.names("format")
    check_dataset_formats(config, formats)
    key = cache_key(config, plugins, tokenizer) if data_cfg.cache else None
    result = load_cached(key) if key else None
    if result is not None:
        result.stats.cached = True
        if result.stats.bad_records:
            log(f"warning: skipped {result.stats.bad_records} invalid records of {result.stats.records} "
                f"(data.on_bad_record: skip; cached data).")
    else:
        result = _prepare_uncached(config, plugins, tokenizer, formats, seed, log, ctx)
        if key:
            save_cached(key, result)
    apply_audit_policy(result.stats.audit, data_cfg.audit, log)
    lengths = example_lengths(result.train)
    result.stats.padded_efficiency = packing_efficiency(lengths, config.training.batch_size, False, seed)
    result.stats.packing_efficiency = 1.0 if data_cfg.packing else result.stats.padded_efficiency
    return result


def read_datasets(config: Any, check: Any, log: Any = print
                  ) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]], DataStats]:
    """Read, validate, shuffle and split a run's records as the supervised path does, for an objective with its
    own data path (``ftcore_prepare_data``): ``(train, held_out, stats)``, each record with where it came from
    (``file:line``).

    ``check(record)`` returns what is wrong with one record as ``(field, message)`` pairs. Invalid records are
    reported with file, line and field and, by ``data.on_bad_record``, raise a DataError or are skipped; the
    held-out records are ``data.eval_datasets`` when given, else a ``data.val_size`` share of the training ones.
    Each dataset's ``max_records`` caps what is read and its ``weight`` samples its training records; the audit
    (``data.audit``) looks for duplicates and train/held-out leakage among the records (``stats.audit``).
    """
    data_cfg = config.data
    if not data_cfg.datasets:
        raise DataError("no training data: pass --data FILE or set data.datasets in the config.")
    seed = data_cfg.seed if data_cfg.seed is not None else config.training.seed
    stats = DataStats()
    problems: list[Problem] = []

    sources: list[int] = []

    def read(specs: Any) -> list[tuple[str, dict[str, Any]]]:
        kept = []
        for k, spec in enumerate(specs):
            before = len(kept)
            for n, (where, record) in enumerate(iter_records(spec)):
                if spec.max_records is not None and n >= spec.max_records:
                    break
                stats.records += 1
                if isinstance(record, Problem):
                    found = [record]
                elif not isinstance(record, dict):
                    found = [Problem(where, None, f"expected a JSON object, got {type(record).__name__}")]
                else:
                    found = [Problem(where, f, m) for f, m in check(record)]
                if found:
                    problems.extend(found)
                    stats.bad_records += 1
                else:
                    kept.append((where, record))
                    sources.append(k)
            stats.per_dataset[spec.path] = len(kept) - before
        return kept

    train = read(data_cfg.datasets)
    del sources[len(train):]   # only the training datasets are weighted
    held_out = read(data_cfg.eval_datasets) if data_cfg.eval_datasets else None
    _report_problems(problems, stats, data_cfg, log)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)   # the same permutation as shuffling the records themselves
    if held_out is None:
        n_val = _val_count(data_cfg.val_size, len(order))
        held_out, order = [train[i] for i in order[:n_val]], order[n_val:]
    unweighted = [train[i] for i in order]
    train = [train[i] for i in apply_weights(order, sources, data_cfg.datasets, seed)]
    if not train:
        raise DataError(f"no training records are left: of {stats.records} records, {stats.bad_records} are "
                        f"invalid and {len(held_out)} went to validation. Add data or lower data.val_size.")
    stats.examples = len(train) + len(held_out)
    stats.train_examples, stats.eval_examples = len(train), len(held_out)
    if data_cfg.audit.enabled:   # duplicates and leakage (the records carry no tokens here)
        audit = Audit(data_cfg.audit.near_duplicates, data_cfg.audit.near_duplicate_threshold)
        for where, record in [*unweighted, *held_out]:
            audit.add(where, record_text(record))
        stats.audit = audit.summary(list(range(len(unweighted))),
                                    list(range(len(unweighted), len(unweighted) + len(held_out))), tokens=False)
        apply_audit_policy(stats.audit, data_cfg.audit, log)
    return train, held_out, stats


def example_lengths(dataset: Any) -> list[int]:
    """Token count of each example, from the Arrow column's offsets (no token is read, nor any row decoded);
    through the dataset's index mapping when it is a selection of its table's rows."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.table.column("input_ids"))
    indices = getattr(dataset, "_indices", None)   # a selection's rows, in order (datasets' own mapping)
    if indices is not None:
        lengths = lengths.take(indices.column(0))
    return lengths.to_pylist()


def _prepare_uncached(config, plugins, tokenizer, formats, seed, log, ctx) -> PreparedData:
    data_cfg = config.data
    stats = DataStats()
    problems: list[Problem] = []
    audit = _new_audit(data_cfg, tokenizer)
    train_src: list[int] = []
    store = _RowStore()   # the training examples, then the held-out ones of data.eval_datasets
    _collect(data_cfg.datasets, config, plugins, tokenizer, formats, stats, problems, ctx, store, audit, train_src)
    n_train = len(store)
    if data_cfg.eval_datasets:
        _collect(data_cfg.eval_datasets, config, plugins, tokenizer, formats, stats, problems, ctx, store, audit, [])
    _report_problems(problems, stats, data_cfg, log)
    _teaches_something(stats, audit, len(store), data_cfg)
    order = list(range(n_train))
    random.Random(seed).shuffle(order)   # the same permutation as shuffling the rows themselves
    if not data_cfg.eval_datasets:
        n_val = _val_count(data_cfg.val_size, len(order))
        eval_idx, train_idx = order[:n_val], order[n_val:]
    else:
        train_idx, eval_idx = order, list(range(n_train, len(store)))
        if not eval_idx:
            raise DataError("no evaluation examples are left in data.eval_datasets ("
                            + ", ".join(s.path for s in data_cfg.eval_datasets)
                            + ") after validation and length limits.")
    if not train_idx:
        raise DataError(f"no training examples are left: of {stats.records} records, {stats.bad_records} are invalid, "
                        f"{stats.dropped_too_long} were dropped as longer than data.max_length={data_cfg.max_length}, "
                        f"{stats.dropped_unsupervised} had nothing supervised left (e.g. truncation cut off the "
                        f"response), and {len(eval_idx)} went to validation. "
                        f"Add data, raise data.max_length or lower data.val_size.")
    if audit is not None:
        stats.audit = audit.summary(train_idx, eval_idx)
    train_idx = _mix(train_idx, train_src, store.lengths, data_cfg, stats, seed, formats)
    stats.train_examples, stats.eval_examples = len(train_idx), len(eval_idx)
    train, held_out = store.datasets(train_idx, eval_idx or None)
    return PreparedData(train, held_out, stats, problems)


def _new_audit(data_cfg: Any, tokenizer: Any) -> Audit | None:
    if not data_cfg.audit.enabled:
        return None
    special = [str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])]
    try:   # added tokens too (a format's markers such as <|im_end|>): not part of an answer's text
        special += [str(t) for t in tokenizer.get_added_vocab()]
    except Exception:   # noqa: BLE001 - a tokenizer without added tokens
        pass
    return Audit(data_cfg.audit.near_duplicates, data_cfg.audit.near_duplicate_threshold, special,
                 data_cfg.max_length)


def _teaches_something(stats: DataStats, audit: Audit | None, kept: int, data_cfg: Any) -> None:
    """Stop (exit 2) when the data would teach nothing: no example kept has a supervised token."""
    if kept or not (stats.dropped_unsupervised or stats.dropped_too_long):
        return
    lines = []
    if audit is not None:
        for name in ("cut_before_answer", "unsupervised"):
            lines += audit.findings[name]
    shown = "".join(f"\n  {line}" for line in lines[: data_cfg.max_errors_shown])
    valid = stats.records - stats.bad_records
    cut = audit.counts["cut_before_answer"] if audit is not None else 0
    counts = (f"of {stats.records} records, {stats.bad_records} are invalid, {stats.dropped_too_long} were dropped "
              f"as longer than data.max_length={data_cfg.max_length}, {stats.dropped_unsupervised} had nothing "
              f"supervised left")
    if cut and cut == stats.dropped_unsupervised:
        raise DataError(f"the data would teach nothing: every example ({cut}) is cut by data.max_length="
                        f"{data_cfg.max_length} before its answer, so no token is supervised ({counts}):{shown}\n"
                        f"Raise data.max_length, or shorten the prompts.")
    if stats.dropped_unsupervised:
        raise DataError(f"the data would teach nothing: none of the {valid} valid examples has a supervised "
                        f"token ({counts}; {cut} cut by data.max_length before the answer):{shown}\n"
                        f"Check the format's field names (the answer field) and data.max_length.")


def apply_weights(train_idx: list[int], sources: list[int], specs: list[Any], seed: int) -> list[int]:
    """Training examples (indices; ``sources[i]``: the index of example i's dataset in ``specs``) sampled by
    their datasets' weights: ``round(n * weight)`` of a dataset's ``n`` examples, every one ``floor(weight)``
    times and a random rest without repeats, all shuffled with ``seed``. Unchanged when no weight is set."""
    if all(s.weight in (None, 1) for s in specs):
        return train_idx
    by_spec: list[list[int]] = [[] for _ in specs]
    for i in train_idx:
        by_spec[sources[i]].append(i)
    rng = random.Random(seed + 1)
    picked: list[int] = []
    for spec, idx in zip(specs, by_spec):
        target = round(len(idx) * (1.0 if spec.weight is None else spec.weight))
        whole, rest = divmod(target, len(idx)) if idx else (0, 0)
        picked += idx * whole + (rng.sample(idx, rest) if rest else [])
    rng.shuffle(picked)
    return picked


def _mix(train_idx: list[int], sources: list[int], lengths: Any, data_cfg: Any, stats: DataStats, seed: int,
         formats: list[str]) -> list[int]:
    """Apply each training dataset's weight to its training examples; record the mix in ``stats.mixture``."""
    specs = data_cfg.datasets
    by_spec: list[list[int]] = [[] for _ in specs]
    for i in train_idx:
        by_spec[sources[i]].append(i)
    train_idx = apply_weights(train_idx, sources, specs, seed)
    counts = [0] * len(specs)
    tokens = [0] * len(specs)
    for i in train_idx:
        counts[sources[i]] += 1
        tokens[sources[i]] += lengths[i]
    total = sum(tokens) or 1
    stats.mixture = [{"path": spec.path, "format": resolve_format(spec, formats),
                      "weight": 1.0 if spec.weight is None else spec.weight, "max_records": spec.max_records,
                      "records": stats.per_dataset_records.get(spec.path, 0),
                      "examples": stats.per_dataset.get(spec.path, 0), "train_examples_unweighted": len(idx),
                      "train_examples": counts[k], "train_tokens": tokens[k],
                      "token_share": round(tokens[k] / total, 4)}
                     for k, (spec, idx) in enumerate(zip(specs, by_spec))]
    return train_idx


def _collect(specs, config, plugins, tokenizer, formats, stats, problems, ctx, store, audit=None, sources=None
             ) -> None:
    """Read, validate, format and tokenize the records of ``specs`` into ``store`` (in file order)."""
    with _Tokenizer(tokenizer, config.data, stats, problems, store, audit) as tokenize:
        for k, spec in enumerate(specs):
            fmt = resolve_format(spec, formats)
            validate = plugins.one_caller(fmt, "ftcore_validate_record")
            render = plugins.one_caller(fmt, "ftcore_format_record")
            before = len(store)
            read = 0
            pending: list[tuple[str, Example, str]] = []
            for where, record in iter_records(spec):
                if spec.max_records is not None and read >= spec.max_records:
                    break
                read += 1
                stats.records += 1
                found = _check(where, record, validate, config, ctx)
                if not found:
                    try:
                        example = render(record=record, tokenizer=tokenizer, config=config, ctx=ctx)
                        if not isinstance(example, Example):
                            raise PluginError(f"format plugin {fmt!r} returned {type(example).__name__} from "
                                              f"ftcore_format_record; it must return an ftcore.Example.")
                        pending.append((where, example, record_text(record) if audit is not None else ""))
                    except DataError as exc:   # a record the format cannot render (e.g. a template refuses it)
                        found = [Problem(where, None, str(exc))]
                if found:
                    problems.extend(found)
                    stats.bad_records += 1
                if len(pending) >= TOKENIZE_BATCH:
                    tokenize.submit(pending)
                    pending = []
            tokenize.submit(pending)
            tokenize.finish()
            stats.per_dataset[spec.path] = len(store) - before
            stats.per_dataset_records[spec.path] = read
            if sources is not None:
                sources += [k] * (len(store) - before)


TOKENIZE_BATCH = 1024   # examples per tokenizer call in prepare(); 1 tokenizes record by record


class _Tokenizer:
    """Tokenizes batches of examples in a thread of its own while the caller reads and formats the next batch
    (the tokenizer works without Python's lock), then applies the length policy, the audit's notes and the
    counts to each batch in order, and writes what is kept to the store. The thread uses a copy of the
    tokenizer, so that a format plugin may use the tokenizer meanwhile."""

    def __init__(self, tokenizer: Any, data_cfg: Any, stats: DataStats, problems: list[Problem],
                 store: _RowStore, audit: Audit | None) -> None:
        import copy
        from concurrent.futures import ThreadPoolExecutor

        self.tokenizer, self.data_cfg, self.stats, self.problems = tokenizer, data_cfg, stats, problems
        self.store, self.audit = store, audit
        self.limit = char_limit(tokenizer, data_cfg.max_length)
        try:
            self.own = copy.deepcopy(tokenizer)
            self.encode = backend_encoder(self.own)
            self.pool: Any = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftcore-tokenize")
        except Exception:   # noqa: BLE001 - a tokenizer that cannot be copied is used in this thread only
            self.own, self.encode, self.pool = tokenizer, None, None
        self.inflight: tuple[list[Any], Any] | None = None

    def __enter__(self) -> _Tokenizer:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _tokenize(self, examples: list[tuple[str, Example, str]]) -> TokenizedBatch | None:
        """The batch tokenized (None where the tokenizer refuses some text: then record by record, in order,
        each refused one named). Only this is done in the thread: its Python work (the lists the tokenizer
        returns, the labels) holds Python's lock, and measured, the audit's signatures were faster in the
        caller's thread (``Audit.add``), next to the tokenizer's own threads, than here."""
        try:
            return tokenize_batch([ex for _, ex, _ in examples], self.own, self.limit, self.encode)
        except Exception:   # noqa: BLE001
            return None

    def submit(self, examples: list[tuple[str, Example, str]]) -> None:
        if not examples:
            return
        previous = self.inflight
        if self.pool is None:
            self.inflight = (examples, _Done(self._tokenize(examples)))
        else:
            self.inflight = (examples, self.pool.submit(self._tokenize, examples))
        if previous is not None:
            self._keep(previous[0], previous[1].result())

    def finish(self) -> None:
        if self.inflight is not None:
            examples, done = self.inflight
            self.inflight = None
            self._keep(examples, done.result())

    def _one_by_one(self, examples: list[tuple[str, Example, str]]) -> tuple[list[Any], TokenizedBatch]:
        """The batch the tokenizer refused, record by record: the refused ones reported and left out."""
        import numpy as np

        kept, parts = [], []
        for where, example, text in examples:
            try:
                parts.append(tokenize_batch([example], self.tokenizer, self.limit))
            except Exception as exc:   # noqa: BLE001
                self.problems.append(Problem(where, None, f"the tokenizer cannot tokenize it "
                                                          f"({type(exc).__name__}: {exc})"))
                self.stats.bad_records += 1
                continue
            kept.append((where, example, text))
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return kept, TokenizedBatch(empty, empty, empty)
        return kept, TokenizedBatch(np.concatenate([p.ids for p in parts]), np.concatenate([p.labels for p in parts]),
                                    np.asarray([len(p.ids) for p in parts], dtype=np.int64))

    def _keep(self, examples: list[tuple[str, Example, str]], batch: TokenizedBatch | None) -> None:
        """Apply the length policy (or split a long ``split_long`` text), count, and keep what teaches something
        (``audit`` notes what is wrong with each example: no answer, an answer cut, nothing supervised)."""
        if batch is None:
            examples, batch = self._one_by_one(examples)
        data_cfg, stats, audit, limit = self.data_cfg, self.stats, self.audit, self.limit
        max_length, too_long = data_cfg.max_length, data_cfg.too_long
        kept: list[tuple[int, int]] = []
        starts = batch.starts.tolist()
        for i, (where, example, text) in enumerate(examples):
            a, b = starts[i], starts[i + 1]
            pieces = [(a, b)]
            if example.split_long and b - a > max_length:   # consecutive chunks; a last one-token chunk predicts
                pieces = [(s, min(s + max_length, b)) for s in range(a, b, max_length)]   # nothing
                pieces = [p for p in pieces if p[1] - p[0] > 1]
                stats.split_documents += 1
            for n, (s, e) in enumerate(pieces):
                cut_supervised = audit is not None and e - s > max_length and (
                    batch.count_supervised(s + max_length, e) > 0
                    or any(end > limit for _, end in example.supervised))   # an answer past the characters tokenized
                truncated = False
                if e - s > max_length:
                    if too_long == "drop":
                        stats.dropped_too_long += 1
                        continue
                    e, truncated = s + max_length, True
                supervised = batch.count_supervised(s, e)
                if supervised == 0:   # e.g. truncation cut off the whole response
                    stats.dropped_unsupervised += 1
                    if audit is not None:
                        if cut_supervised:
                            audit.note("cut_before_answer", where, f"the answer starts after data.max_length="
                                       f"{max_length} tokens")
                        else:
                            audit.note("unsupervised", where, "the format supervises no token of it")
                    continue
                if audit is not None:
                    if cut_supervised:
                        audit.note("answer_cut", where, f"the answer is cut at data.max_length={max_length}")
                    if len(pieces) == 1 and audit.empty_answer(example):
                        audit.note("empty_answers", where)
                    if len(pieces) == 1:
                        audit.add(where, text, e - s, supervised)
                    else:   # a chunk of a split document is compared by its own text
                        audit.add(f"{where} (chunk {n + 1})",
                                  " ".join(self.tokenizer.decode(batch.ids[s:e].tolist()).lower().split()),
                                  e - s, supervised)
                stats.truncated += truncated
                stats.examples += 1
                stats.tokens += e - s
                stats.supervised_tokens += supervised
                kept.append((s, e))
        self.store.append(batch, kept)


class _Done:
    """A result at hand, shaped like a future's."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


class _RowStore:
    """Tokenized examples (``input_ids``, ``labels``), written to an Arrow file batch by batch as they are made:
    a big dataset's tokens are held by the file (on disk; mapped when read), not by Python lists. The file is in
    a folder of this process under the cache root (``work_folder``), removed when the process exits."""

    def __init__(self) -> None:
        from array import array

        import pyarrow as pa

        self.schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
        self.path = work_folder() / f"rows-{next(_STORES)}.arrow"
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self.lengths = array("q")   # every example's token count, in order

    def __len__(self) -> int:
        return len(self.lengths)

    def append(self, batch: TokenizedBatch, kept: list[tuple[int, int]]) -> None:
        """Write the flat positions ``start:stop`` of ``batch`` named by ``kept``, each as one example."""
        import numpy as np
        import pyarrow as pa

        if not kept:
            return
        take = np.zeros(len(batch.ids), dtype=bool)
        lengths = []
        for s, e in kept:
            take[s:e] = True
            lengths.append(e - s)
        offsets = np.zeros(len(kept) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        columns = [pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[take].astype(np.int32)))
                   for values in (batch.ids, batch.labels)]
        self._writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.lengths.extend(lengths)

    def datasets(self, *selections: list[int] | None) -> list[Any]:
        """The file as a dataset, one for each selection of examples (by index, in that order; None: none)."""
        import datasets

        self._writer.close()
        self._sink.close()
        whole = datasets.Dataset.from_file(str(self.path))
        return [None if sel is None else whole.select(sel) for sel in selections]


_STORES = itertools.count(1)
_WORK: Path | None = None


def work_folder() -> Path:
    """This process's folder for the data it prepares (under the cache root; the system's temporary folder when
    that is not writable), removed at exit; folders that earlier processes on this machine left are removed."""
    import atexit
    import shutil
    import socket
    import tempfile

    global _WORK
    if _WORK is not None and _WORK.exists():
        return _WORK
    host = socket.gethostname().replace(os.sep, "_")
    root = cache_root() / "data" / "work"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(f"{host}-*"):
            pid = old.name[len(host) + 1:].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        _WORK = Path(tempfile.mkdtemp(dir=root, prefix=f"{host}-{os.getpid()}-"))
    except OSError:
        _WORK = Path(tempfile.mkdtemp(prefix="ftcore-data-"))
    atexit.register(shutil.rmtree, _WORK, True)
    return _WORK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _check(where: str, record: Any, validate: Any, config: Any, ctx: RunContext) -> list[Problem]:
    if isinstance(record, Problem):
        return [record]
    if not isinstance(record, dict):
        return [Problem(where, None, f"expected a JSON object, got {type(record).__name__}")]
    found = validate(record=record, config=config, ctx=ctx) or []
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
