"""The cache of tokenized data, keyed by what it depends on: the data's content, the tokenizer and the
format settings (not batching settings)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ftcore.data.prepared import DataStats, PreparedData
from ftcore.data.records import expand_paths, is_local_path, load_by_name
from ftcore.files import cache_root
from ftcore.version import __version__


def cache_key(config: Any, plugins: Any, tokenizer: Any) -> str:
    """What the tokenized data depends on: the data (by content), the tokenizer, the format settings.

    Settings that only change how batches are built (batch size, packing) are not part of it.
    """
    h = hashlib.sha256()
    d = config.data
    for spec in [*d.datasets, *d.eval_datasets]:
        h.update(spec.model_dump_json().encode())
        files = expand_paths(spec.path, txt=spec.txt_documents != "auto")
        for f in files:
            h.update(f"{f.resolve()}:{content_digest(f)}".encode())
        if not files and not is_local_path(spec.path):   # a datasets-library name: its content fingerprint
            h.update(str(getattr(load_by_name(spec), "_fingerprint", "")).encode())
    h.update(json.dumps([d.max_length, d.too_long, d.on_bad_record, d.val_size,
                         d.seed if d.seed is not None else config.training.seed]).encode())
    # the audit's findings are cached with the data (the policies, warn or error, are applied after loading)
    h.update(json.dumps(["audit-2", d.audit.enabled, d.audit.near_duplicates,
                         d.audit.near_duplicate_threshold]).encode())
    for name in plugins.names("format"):
        if name in config.sections:
            h.update(config.section(name).model_dump_json().encode())
        h.update(f"{name}:{plugins.infos[name].distribution}:{plugins.infos[name].version}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
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
