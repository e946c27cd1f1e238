"""Exporter: merge the trained adapter into its base and save it as output/merged (safetensors + tokenizer).

Add ``merge`` to the run's plugins (``--plugins lora,alpaca,merge``). The merge itself is
done by the run's adapter plugin (``ftcore_merge_adapter``), at 16/32-bit. It runs before
other exporters and leaves the folder in ``ctx.merged_dir``, so they use it instead of merging again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

import ftcore

NAME = "merge"


class MergeConfig(ftcore.PluginConfig):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype of the merged model; auto: the base's saved dtype.")
    output: str = Field("merged", description="Folder name inside the run's output directory.")

    @field_validator("output")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or Path(value).name != value or value in (".", ".."):
            raise ValueError("must be a plain folder name inside the run's output directory")
        return value


@ftcore.hookimpl
def ftcore_config_schema():
    return MergeConfig


@ftcore.hookimpl
def ftcore_run_started(config: Any, ctx: Any) -> None:
    """Fail before training, not after it, when nothing in this run can merge an adapter."""
    if not ctx.plugins.hook.ftcore_merge_adapter.get_hookimpls():
        adapter = ", ".join(ctx.plugins.names("adapter")) or "none"
        raise ftcore.ConfigError(
            f'the "merge" exporter needs an adapter plugin that can merge (this run\'s adapter plugin: {adapter}, '
            f"which does not implement ftcore_merge_adapter). A full fine-tune already writes a whole model to "
            f"output/model: remove merge from --plugins.")


@ftcore.hookimpl(tryfirst=True)
def ftcore_export(run_dir: Path, model_dir: Path, config: Any, ctx: Any) -> list[Path]:
    """Merge into RUN/merged (or ``ftcore export --output``); later exporters find it in ``ctx.merged_dir``."""
    settings: MergeConfig = config.section(NAME)
    if ctx.model_run is not None:   # the model was a finished run: the folder it resolved to is the base
        base = ctx.model_path
    else:
        base = ftcore.resolve_model_path(config.model.path, ctx.log, revision=config.model.revision,
                                         trust_remote_code=config.model.trust_remote_code)
    target = ctx.export_output or Path(run_dir) / settings.output
    out = ftcore.merge_adapter(model_dir, target, base=str(base), dtype=settings.dtype, plugins=ctx.plugins,
                               ctx=ctx, log=ctx.log, replace=config.overwrite)
    ctx.merged_dir = out
    return [out]
