"""A finished ftcore run as the model of the next run (SFT, then DPO): ``--model RUN_FOLDER``.

A run that trained the whole model gives its ``model/`` folder. A run that trained an adapter gives, by
``model.from_run``: ``merge``, the adapter folded into its base (through the run's adapter plugin's
``ftcore_merge_adapter``), saved once in ftcore's cache and trained on like any model; or ``continue``, the
run's base with ``ctx.continue_adapter`` set, which the adapter plugin loads trainable instead of a new adapter.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from ftcore import runfolder
from ftcore.errors import ConfigError
from ftcore.files import atomic_folder, cache_root
from ftcore.models.paths import resolve_run_model
from ftcore.types import RunContext


def is_run_model(path: str) -> bool:
    """Whether a model path names an ftcore run's output folder."""
    folder = Path(str(path)).expanduser()
    return folder.is_dir() and runfolder.is_run(folder)


def resolve_from_run(ctx: RunContext) -> Path:
    """The local model folder for a run whose ``model.path`` is a finished run (setting ``ctx.continue_adapter``
    when it keeps training the run's adapter)."""
    run = Path(str(ctx.config.model.path)).expanduser()
    ctx.model_run = run
    saved = runfolder.saved_model_dir(run)
    if saved is None:
        raise ConfigError(f"model {run} is an ftcore run that has not finished (no adapter/ or model/ folder): "
                          f"finish it (the same command with --resume auto), or use another model.")
    if saved.name == runfolder.MODEL:
        return resolve_run_model(_model_config(saved), ctx.log)
    base = base_of(run, ctx)
    if ctx.config.model.from_run == "continue":
        ctx.continue_adapter = saved
        ctx.log(f"model: {run} (keeps training its adapter {saved} on its base {base})")
        return base
    return merged_base(saved, base, ctx)


def base_of(run: Path, ctx: RunContext) -> Path:
    """The base model the run trained its adapter on, resolved as that run resolved it (its config.yaml)."""
    try:
        settings = yaml.safe_load((run / runfolder.CONFIG).read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model {run}: its {runfolder.CONFIG} is missing or unreadable ({exc}), so its base "
                          f"model is unknown.") from None
    from ftcore.config.schema import ModelConfig

    model = ModelConfig(**settings)
    if is_run_model(model.path):   # a chain: that run's model was a run too
        inner = RunContext(config=ctx.config.model_copy(update={"model": model}), plugins=ctx.plugins,
                           output_dir=ctx.output_dir, log=ctx.log)
        found = resolve_from_run(inner)
        if inner.continue_adapter is not None:
            raise ConfigError(f"model {run} continued the adapter of {model.path}; merge that chain first "
                              f"(`ftcore merge`) and train on the merged model.")
        return found
    return resolve_run_model(model, ctx.log)


def merged_base(adapter: Path, base: Path, ctx: RunContext) -> Path:
    """The adapter merged into its base, built once per adapter and base in ftcore's cache."""
    digest = hashlib.sha256()
    for f in sorted(adapter.glob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json"):
            digest.update(f.name.encode() + f.read_bytes())
    digest.update(str(base.resolve()).encode())
    folder = cache_root() / "merged-runs" / digest.hexdigest()[:20]
    if (folder / "config.json").is_file():
        ctx.log(f"model: {adapter} merged into {base} (from the cache: {folder})")
        return folder
    ctx.log(f"model: merging {adapter} into its base {base} before training (once; kept in {folder})")
    merged = ctx.plugins.hook.ftcore_merge_adapter(adapter_dir=str(adapter), base_path=str(base), dtype="auto",
                                                   ctx=ctx)
    if merged is None:
        raise ConfigError(f"model {adapter.parent}: no selected adapter plugin can merge its adapter {adapter}; "
                          f"select the plugin it was trained with, or set model.from_run: continue.")
    from ftcore.models.loading import load_pretrained_tokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder, replace=True) as tmp:
        merged.save_pretrained(str(tmp))
        load_pretrained_tokenizer(adapter).save_pretrained(str(tmp))   # its chat template and added tokens
    return folder


def _model_config(folder: Path) -> Any:
    from ftcore.config.schema import ModelConfig

    return ModelConfig(path=str(folder))
