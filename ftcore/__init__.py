"""ftcore: a plugin-based engine for fine-tuning open LLMs (LoRA, QLoRA, full)."""

from ftcore.config import PluginConfig, RunConfig
from ftcore.data import Example
from ftcore.engine import RunContext, RunResult, resolve, run
from ftcore.errors import ConfigError, DataError, FtcoreError, PluginError
from ftcore.estimate import MemoryProfile, OptimizerProfile
from ftcore.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataError", "Example", "FtcoreError", "MemoryProfile", "OptimizerProfile", "PluginConfig",
    "PluginError", "RunConfig", "RunContext", "RunResult", "__version__", "hookimpl", "hookspec", "resolve", "run",
]
