"""ftcore: a plugin-based engine for fine-tuning open LLMs (LoRA, QLoRA, full).

This module is the public API: everything a plugin or an application needs is importable
from ``ftcore`` itself, and the bundled plugins use nothing else (a test checks it). The
submodules are grouped by layer (docs/architecture.md) and may change between versions.
"""

from ftcore.config.layering import deep_merge
from ftcore.config.schema import PluginConfig, RunConfig
from ftcore.data.pipeline import read_datasets
from ftcore.data.prepared import DataStats, PreparedData
from ftcore.errors import ConfigError, DataError, FtcoreError, OutputError, PluginError
from ftcore.files import atomic_folder, write_json_atomic, write_text_atomic
from ftcore.hookspecs import hookimpl, hookspec
from ftcore.models.generation import ChatSession, complete, generate_ids
from ftcore.models.loading import fix_mmap_threshold, load_base_model, mmap_threshold_set_by_user
from ftcore.models.paths import resolve_model_path
from ftcore.models.peft_merge import merge_peft_adapter
from ftcore.registry.pluginset import PluginSet, quantized_adapters
from ftcore.registry.resolution import resolve
from ftcore.reporting.card import write_model_card
from ftcore.reporting.progress import Reporter, make_reporter
from ftcore.tools.adapter_merge import merge_adapter
from ftcore.tools.estimate import estimate
from ftcore.tools.export import export
from ftcore.tools.generate import load as load_for_generation
from ftcore.tools.prepare import prepare_data
from ftcore.training.devices import local_device_index, rank_device_map
from ftcore.training.engine import run
from ftcore.training.processes import (
    free_port,
    hostfile_launcher_command,
    launch_with_hostfile,
    launch_with_torchrun,
    read_hostfile,
)
from ftcore.training.trainer import supervised_trainer
from ftcore.types import (
    Example,
    MemoryProfile,
    ObjectiveProfile,
    OptimizerProfile,
    RunContext,
    RunResult,
    ShardingProfile,
)
from ftcore.version import __version__

__all__ = [
    # writing a plugin
    "hookimpl", "hookspec", "PluginConfig", "RunConfig", "RunContext", "RunResult", "Example", "PluginSet",
    "MemoryProfile", "OptimizerProfile", "ObjectiveProfile", "ShardingProfile",
    # errors a plugin raises for the user (exit status 2, no traceback)
    "FtcoreError", "ConfigError", "DataError", "PluginError", "OutputError",
    # helpers plugins use
    "write_text_atomic", "write_json_atomic", "atomic_folder", "deep_merge", "resolve_model_path", "load_base_model",
    "merge_peft_adapter", "merge_adapter", "write_model_card", "local_device_index", "rank_device_map",
    # strategy plugins: starting the ranks
    "quantized_adapters", "fix_mmap_threshold", "mmap_threshold_set_by_user", "launch_with_torchrun", "launch_with_hostfile", "hostfile_launcher_command", "read_hostfile", "free_port",
    # objectives: their data path and the supervised trainer
    "read_datasets", "PreparedData", "DataStats", "supervised_trainer",
    # the library behind each command
    "run", "resolve", "prepare_data", "export", "estimate", "load_for_generation", "generate_ids", "complete",
    "ChatSession", "Reporter", "make_reporter",
    "__version__",
]
