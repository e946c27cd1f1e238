"""The plugins bundled with ftcore. Each registers through the ``ftcore.plugins`` entry
point group in pyproject.toml, exactly as a third party's would; none is imported
unless a run selects it."""
