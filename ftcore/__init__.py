"""ftcore: a plugin-based engine for fine-tuning open LLMs (LoRA, QLoRA, full)."""

from ftcore.config import PluginConfig, RunConfig
from ftcore.data import Example
from ftcore.engine import RunContext, RunResult, resolve, run
from ftcore.errors import ConfigError, DataError, FtcoreError, PluginError
from ftcore.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataError", "Example", "FtcoreError", "PluginConfig", "PluginError", "RunConfig",
    "RunContext", "RunResult", "__version__", "hookimpl", "hookspec", "resolve", "run",
]
