"""The run configuration: its schema (``schema``), layering defaults < file < flags (``layering``),
validation of the core and plugin sections (``validation``) and cross-key checks (``checks``)."""
