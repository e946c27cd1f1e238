"""The plugins bundled with ftcore, grouped by kind (formats, adapters, optimizers, strategies, exporters,
objectives).

Each registers through the ``ftcore.plugins`` entry point group in pyproject.toml, exactly as a
third party's would, imports nothing of ftcore but its public API (``import ftcore``; a test
checks it), and is imported only when a run selects it.
"""
