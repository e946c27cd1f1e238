"""Real installed distributions for tests: a dist-info folder and modules in a folder put on sys.path.

importlib.metadata finds them exactly as it finds a pip-installed package, so entry points,
distribution names and versions are the real thing, not a patched lookup.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path


def install(site: Path, monkeypatch, name: str, version: str = "1.0", entry_points: dict[str, str] | None = None,
            modules: dict[str, str] | None = None) -> Path:
    """Install distribution ``name`` into ``site`` (put on sys.path for the test); return ``site``.

    ``entry_points``: plugin name -> entry point value in the ``ftcore.plugins`` group;
    ``modules``: module file name (``"pkg.py"`` or ``"pkg/__init__.py"``) -> source.
    """
    folder = site / f"{name.replace('-', '_')}-{version}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in (entry_points or {}).items())
    (folder / "entry_points.txt").write_text(f"[ftcore.plugins]\n{lines}")
    for filename, source in (modules or {}).items():
        path = site / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    (folder / "RECORD").write_text("".join(f"{f},,\n" for f in (modules or {})))
    (folder / "top_level.txt").write_text("".join(f"{Path(f).parts[0].removesuffix('.py')}\n" for f in (modules or {})))
    if str(site) not in sys.path:
        monkeypatch.syspath_prepend(str(site))
    return site
