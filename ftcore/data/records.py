"""Reading records from what a user points at: JSONL/JSON/CSV/Parquet and plain-text files, globs, folders,
saved datasets and datasets-library names. Each record comes with where it came from (``file:line``), and an
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

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


@dataclass
class Problem:
    where: str           # "train.jsonl:12"
    field: str | None    # "messages[2].role" or None for the whole line
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field + ': ' if self.field else ''}{self.message}"


def expand_paths(path: str, txt: bool = False) -> list[Path]:
    """A file, a glob or a folder -> the data files it names (empty when none). A folder's .txt files are
    data only with ``txt`` (a dataset whose ``txt_documents`` says how they hold documents); otherwise they
    are taken for notes and READMEs."""
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        return sorted(Path(m) for m in glob.glob(str(p), recursive=True) if m.endswith(LOCAL_SUFFIXES))
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return [p]
        suffixes = LOCAL_SUFFIXES if txt else tuple(s for s in LOCAL_SUFFIXES if s != ".txt")
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes
                      and not any(part.startswith(".") for part in f.relative_to(p).parts))
    return [p] if p.exists() else []


def iter_records(spec: Any) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` for one dataset spec; ``record`` is a Problem for an unreadable row."""
    if not spec.path.strip():
        raise DataError("a data path is empty (data.datasets / --data): give a file, a glob, a folder or a "
                        "datasets-library name.")
    documents = getattr(spec, "txt_documents", "auto")
    files = expand_paths(spec.path, txt=documents != "auto")
    if not files:
        if is_local_path(spec.path) or Path(spec.path).expanduser().is_dir():
            raise DataError(not_found_message(spec.path))
        yield from _iter_hub_or_saved(spec)
        return
    for f in files:
        if f.is_dir():
            yield from _iter_saved(f, spec)
        elif f.suffix == ".jsonl":
            yield from _iter_jsonl(f)
        elif f.suffix == ".json":
            yield from _iter_json(f)
        elif f.suffix in (".csv", ".parquet"):
            yield from _iter_tabular(f)
        elif f.suffix == ".txt" and documents != "auto":
            yield from iter_text(f, documents)
        else:
            yield from _iter_by_content(f)


def not_found_message(path: str) -> str:
    """Why a local data path gave no files: nothing there, or a folder without files ftcore reads."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        found: dict[str, int] = {}
        for f in folder.rglob("*"):
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts):
                found[f.suffix or "(no suffix)"] = found.get(f.suffix or "(no suffix)", 0) + 1
        held = ", ".join(f"{n} {suffix}" for suffix, n in sorted(found.items())) or "no files"
        hint = (" To train on its .txt files as plain text, set txt_documents: file (or blank_line) in its "
                "data.datasets entry, with the text format.") if ".txt" in found else ""
        return (f"data folder {path} holds no data files ftcore reads ({', '.join(LOCAL_SUFFIXES)}); it holds "
                f"{held}. Point data.datasets / --data at the data files, or convert them.{hint}")
    return (f"data file {path} not found (no such file, folder or matching glob). "
            f"Check the path in data.datasets / --data.")


def iter_text(path: Path, documents: str = "file") -> Iterator[tuple[str, Any]]:
    """A plain-text file as ``{"text": ...}`` records: the whole file as one document (``file``), or one per
    block of lines between blank lines (``blank_line``), each named by the line it starts on."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8.") from None
    if documents == "file":
        if text.strip():
            yield f"{path}:1", {"text": text.rstrip("\r\n")}
        return
    block: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield f"{path}:{start}", {"text": "\n".join(block)}
            block = []
    if block:
        yield f"{path}:{start}", {"text": "\n".join(block)}


def _iter_by_content(path: Path) -> Iterator[tuple[str, Any]]:
    """A data file whose suffix says nothing: JSON Lines or a JSON array by its first character; else a .txt
    file is one plain-text document, and anything else is refused."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"{"):
        yield from _iter_jsonl(path)
    elif head.startswith(b"["):
        yield from _iter_json(path)
    elif path.suffix == ".txt":
        yield from iter_text(path, "file")
    else:
        raise DataError(f"{path}: not a data file ftcore reads: its name ends in {path.suffix or 'nothing'} and it "
                        f"does not hold JSON. ftcore reads {', '.join(LOCAL_SUFFIXES)} files; rename it or "
                        f"convert it.")


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
            if lineno == 1 and line.lstrip().startswith("["):
                raise DataError(f"{where}: this file holds one JSON array, not one JSON object per line as a .jsonl "
                                f"file does: name it .json, or write one record per line.")
            yield where, parse_json(line, where)


def parse_json(text: str, where: str) -> Any:
    """One JSON record, or a Problem saying what is wrong with it (never an exception)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return Problem(where, None, f"malformed JSON at column {exc.colno}: {exc.msg}")
    except RecursionError:
        return Problem(where, None, "nested too deeply to read (thousands of levels of brackets)")
    except ValueError as exc:   # e.g. an integer of more digits than Python converts
        return Problem(where, None, f"malformed JSON: {exc}")
    if "\\u" not in text and _encodes(text):
        return record   # no escape and no lone surrogate in the text: none in what it parses to
    bad = unpaired_surrogate(record)
    if bad is not None:
        return Problem(where, bad or None, "holds an unpaired UTF-16 surrogate (an escape such as \\ud83d without "
                                           "its pair): not valid Unicode text; fix the escape or drop the record")
    return record


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unpaired_surrogate(value: Any, path: str = "") -> str | None:
    """The field path of the first string holding a lone surrogate ('' for the record itself), or None."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(item, dict):
            for key, sub in item.items():
                if isinstance(key, str):
                    stack.append((key, where))
                stack.append((sub, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            stack.extend((sub, f"{where}[{i}]") for i, sub in enumerate(item))
    return None


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
        data = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to read (thousands of levels of brackets).") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON at column {exc.colno}: {exc.msg}. "
                        f"(A file of one JSON object per line should be named .jsonl.)") from None
    except ValueError as exc:
        raise DataError(f"{path}: malformed JSON: {exc}.") from None
    if isinstance(data, list):
        for where, record in zip(_array_item_lines(path, text), data):
            bad = unpaired_surrogate(record)
            yield where, record if bad is None else Problem(where, bad or None, "holds an unpaired UTF-16 surrogate: "
                                                            "not valid Unicode text")
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
                yield f"{path}:{start}", {k: v for k, v in rec.items() if k is not None}   # cells stay text
                start = reader.line_num + 1
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 (bad byte near line {start}); re-save it as UTF-8.") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None


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
