"""Writing files so that a reader never sees half of one: write aside, flush, rename into place.

Part of the public API (``ftcore.write_text_atomic``, ``ftcore.write_json_atomic``,
``ftcore.atomic_folder``): plugins that write into a run's folder use them too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed into place; return the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """``write_text_atomic`` of ``data`` as indented JSON (paths and other objects as strings)."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it becomes ``path`` when the block ends without error.

    On an error the temporary folder is removed and ``path`` is left as it was. An existing
    ``path`` is an error unless ``replace`` (then it is removed just before the rename) or it is
    an empty folder.
    """
    final = Path(path)
    if final.exists() and not replace and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} already exists and is not empty")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.is_dir():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()
    os.replace(tmp, final)


def cache_root() -> Path:
    """Where ftcore keeps what it can rebuild (tokenized data, the builtin model): ``$FTCORE_CACHE``,
    else ``~/.cache/ftcore``."""
    return Path(os.environ.get("FTCORE_CACHE", Path.home() / ".cache" / "ftcore"))
