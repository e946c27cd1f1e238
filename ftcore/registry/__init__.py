"""Plugins: finding installed ones by entry point (``discovery``), a fresh pluggy manager per run
(``pluginset``), choosing a run's plugins (``selection``) and resolving a run's config with them
(``resolution``)."""
