"""Reading records from what a user points at: JSONL/JSON/CSV/Parquet files, globs, folders, saved datasets
and datasets-library names. Each record comes with where it came from (``file:line``), and an
unreadable row comes as a ``Problem`` instead of stopping the read.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcore.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Problem:
    where: str           # "train.jsonl:12"
    field: str | None    # "messages[2].role" or None for the whole line
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field + ': ' if self.field else ''}{self.message}"


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
        if is_local_path(spec.path):
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


def is_local_path(path: str) -> bool:
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


def load_by_name(spec: Any) -> Any:
    """A datasets-library dataset by name (a Hub id such as ``org/name``, at ``spec.revision``), through the
    datasets cache; offline (HF_HUB_OFFLINE) the cached copy is used."""
    import datasets

    try:
        return datasets.load_dataset(spec.path, spec.name, split=spec.split, revision=getattr(spec, "revision", None))
    except Exception as exc:  # offline, not found, gated, ...
        raise DataError(dataset_error(spec, exc)) from None


def _iter_hub_or_saved(spec: Any) -> Iterator[tuple[str, Any]]:
    ds = load_by_name(spec)
    for i, rec in enumerate(ds):
        yield f"{spec.path}[{spec.split} {i}]", rec


def dataset_error(spec: Any, exc: BaseException) -> str:
    """What went wrong loading a dataset by name, and what to do; the token is never shown."""
    from ftcore.models.hub import endpoint, offline

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    page = f"{endpoint()}/datasets/{spec.path}"
    if type(exc).__name__ == "DatasetNotFoundError":
        if "gated" in text:
            return (f"dataset {spec.path} is gated: accept its conditions at {page} (logged in), then give ftcore "
                    f"your Hugging Face token (`hf auth login`, or HF_TOKEN). {text}")
        if text.startswith("Revision"):
            return f"dataset {spec.path} has no revision {spec.revision!r}: give a branch, tag or commit that exists."
        return (f"data path {spec.path}: no local file or folder of that name, and no dataset {spec.path} on the Hub "
                f"({endpoint()}), or it is private and your token cannot see it. Check data.datasets / --data.")
    if isinstance(exc, ConnectionError):
        why = "HF_HUB_OFFLINE is set" if offline() else f"the Hub ({endpoint()}) could not be reached"
        return (f"dataset {spec.path} is not in the datasets cache, and {why}. Load it once with network access "
                f"(HF_HUB_OFFLINE unset), or pass a local file.")
    return (f"dataset {spec.path!r} is neither a local file nor a loadable datasets-library dataset "
            f"({type(exc).__name__}: {text}).")
