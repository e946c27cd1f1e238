"""Loading a model to try it (``ftcore generate``, ``ftcore chat``): a base or merged folder, an adapter
(merged into its base by the adapter plugin that knows it), or a run's output folder.

Adapters are merged through the ``ftcore_merge_adapter`` hook (``tools.adapter_merge``), so the
core names no adapter method. Generation itself is ``ftcore.models.generation``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftcore import runfolder
from ftcore.errors import ConfigError
from ftcore.models.hub import parse_hub_id
from ftcore.models.loading import load_pretrained_model, load_pretrained_tokenizer
from ftcore.models.paths import resolve_model_path
from ftcore.tools.adapter_merge import merged_model, tokenizer_for

GENERATION_ORDER = (runfolder.MODEL, runfolder.MERGED, runfolder.ADAPTER)   # what a run folder offers, best first


def locate(model: str, adapter: str | None = None) -> tuple[Path, Path | None]:
    """``(base_or_merged_dir, adapter_dir)`` from what the user passed."""
    if model.startswith("ftcore:") or parse_hub_id(model) is not None:
        return resolve_model_path(model), _adapter_folder(adapter)
    model_dir = Path(model).expanduser()
    if not model_dir.exists():
        raise ConfigError(f"--model {model_dir}: no such folder.")
    if runfolder.is_run(model_dir):
        found = next((model_dir / n for n in GENERATION_ORDER if (model_dir / n).is_dir()), None)
        if found is None:
            raise ConfigError(f"--model {model_dir} is an ftcore run without a saved model or adapter "
                              f"(did it finish?).")
        model_dir = found
    if (model_dir / "adapter_config.json").exists():
        if adapter is not None:
            raise ConfigError(f"--model {model_dir} is an adapter; pass the base model as --model and the "
                              f"adapter as --adapter.")
        return _adapter_base(model_dir), model_dir
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"--model {model_dir} is not a transformers model folder (no config.json) "
                          f"nor an adapter (no adapter_config.json).")
    return resolve_model_path(str(model_dir)), _adapter_folder(adapter)   # safetensors weights, checked


def _adapter_folder(adapter: str | None) -> Path | None:
    adapter_dir = Path(adapter).expanduser() if adapter else None
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").exists():
        raise ConfigError(f"--adapter {adapter_dir} has no adapter_config.json: it is not an adapter folder.")
    return adapter_dir


def _adapter_base(adapter_dir: Path) -> Path:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if base and (str(base).startswith("ftcore:") or parse_hub_id(str(base)) is not None):
        return resolve_model_path(base, revision=cfg.get("revision"))
    if not base or not Path(base).exists():
        raise ConfigError(f"adapter {adapter_dir} names base model {base!r}, which is not a folder here: "
                          f"pass the base model folder with --model and the adapter with --adapter.")
    return resolve_model_path(str(base))


def pick_dtype(dtype: str = "auto") -> str:
    from ftcore.training import devices

    if dtype != "auto":
        return dtype
    if devices.cuda_available():
        return "bfloat16" if devices.native_bf16() else "float16"
    return "float32"


def load(model: str, adapter: str | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """Load a model (merging an adapter through its plugin) and its tokenizer, ready to generate."""
    import torch

    from ftcore.quiet import quiet_libraries

    quiet_libraries()
    base_dir, adapter_dir = locate(model, adapter)
    dtype = pick_dtype(dtype)
    if adapter_dir is not None:
        net = merged_model(adapter_dir, str(base_dir), dtype, any_installed=True)   # any plugin that knows it
        tok = tokenizer_for(adapter_dir, net)
    else:
        tok = load_pretrained_tokenizer(base_dir)
        net = load_pretrained_model(base_dir, dtype=getattr(torch, dtype))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    net.config.use_cache = True
    net.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return net, tok
