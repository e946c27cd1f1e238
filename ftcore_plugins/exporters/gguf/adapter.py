"""A PEFT LoRA adapter as a GGUF adapter file, which llama.cpp applies to the base model's GGUF.

llama.cpp's adapter format (``general.type = adapter``, ``adapter.type = lora``) holds, for each adapted
matrix W, the tensors ``NAME.weight.lora_a`` (PEFT's lora_A, rows = rank) and ``NAME.weight.lora_b``
(lora_B); at run time it adds ``scale * alpha / rank * B @ A`` to W, with ``scale`` the user's
(``--lora-scaled``, llama-cpp-python's ``lora_scale``; 1 by default). PEFT's own factor per module
(alpha/r, or alpha/sqrt(r) with rsLoRA, per-module ranks and alphas) is reproduced exactly: where it differs
from the file's single alpha over the module's rank, the difference is folded into B.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ftcore import ConfigError
from ftcore_plugins.exporters.gguf import arch as arch_mod

PREFIX = "base_model.model."


def read_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's settings, refused when llama.cpp's adapter format cannot express them."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    where = f"gguf-export: {adapter_dir}"
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where} is a {config.get('peft_type')} adapter; a GGUF adapter file holds LoRA only. "
                          f"Export the merged model instead (gguf-export.adapter: false).")
    problems = {"use_dora": "DoRA's magnitude vectors", "modules_to_save": "fully trained modules (modules_to_save)",
                "trainable_token_indices": "trained token rows (trainable_token_indices)",
                "fan_in_fan_out": "fan_in_fan_out layers"}
    for key, what in problems.items():
        if config.get(key):
            raise ConfigError(f"{where} has {what}, which a GGUF adapter file cannot hold; export the merged "
                              f"model instead (gguf-export.adapter: false).")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"{where} trains biases (bias: {config['bias']}), which a GGUF adapter file cannot hold; "
                          f"export the merged model instead (gguf-export.adapter: false).")
    return config


def module_scale(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(rank, PEFT's scaling) of one adapted module, after rank_pattern and alpha_pattern."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    for key, value in (config.get("rank_pattern") or {}).items():
        if module == key or module.endswith("." + key):
            rank = int(value)
    for key, value in (config.get("alpha_pattern") or {}).items():
        if module == key or module.endswith("." + key):
            alpha = float(value)
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def tensors(adapter_dir: Path, config: dict[str, Any], arch: arch_mod.Arch, hparams: dict[str, Any]
            ) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every lora_a and lora_b, in llama.cpp's names and row order."""
    import gguf
    from safetensors.numpy import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError(f"gguf-export: {adapter_dir} has no adapter_model.safetensors to export.")
    weights = {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.gguf_arch)
    names = gguf.get_tensor_name_map(arch_enum, hparams["num_hidden_layers"])
    alpha = float(config["lora_alpha"])
    out, unknown = [], []
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module = key[len(PREFIX):-len(".lora_A.weight")] if key.startswith(PREFIX) else key[:-len(".lora_A.weight")]
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        b_key = key.replace(".lora_A.", ".lora_B.")
        if target is None or b_key not in weights:
            unknown.append(module)
            continue
        rank, scaling = module_scale(config, module)
        lora_b = weights[b_key] * np.float32(scaling / (alpha / rank))   # 1 where alpha/rank is PEFT's own factor
        transform = arch_mod.tensor_transform(module + ".weight", arch, hparams)
        if transform is not None:
            lora_b = transform(lora_b)    # B's rows are the output rows: the same reordering as the matrix's
        out += [(target + ".lora_a", weights[key]), (target + ".lora_b", np.ascontiguousarray(lora_b))]
    leftover = [k for k in weights if ".lora_A." not in k and ".lora_B." not in k]
    if unknown or leftover:
        raise ConfigError(f"gguf-export: {adapter_dir}: adapter tensors with no llama.cpp counterpart: "
                          f"{', '.join((unknown + leftover)[:5])}; export the merged model instead "
                          f"(gguf-export.adapter: false).")
    if not out:
        raise ConfigError(f"gguf-export: {adapter_dir}/adapter_model.safetensors holds no LoRA matrices.")
    return out


def write(adapter_dir: Path, pairs: list[tuple[str, np.ndarray]], output: Path, arch: arch_mod.Arch, kind: str,
          name: str, log: Callable[[str], None] = print) -> Path:
    """Write the adapter file (``pairs`` from ``tensors``) to ``output`` (f32 or f16 matrices), atomically."""
    import gguf

    from ftcore_plugins.exporters.gguf.writer import write_atomically

    config = read_config(adapter_dir)
    dtype = np.float32 if kind == "f32" else np.float16
    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for tensor_name, array in pairs:
        writer.add_tensor_info(tensor_name, array.shape, np.dtype(dtype), array.size * np.dtype(dtype).itemsize)
    log(f"gguf-export: writing the adapter {output} ({len(pairs) // 2} matrices, rank {config['r']}, {kind})")
    return write_atomically(writer, output, (array.astype(dtype) for _, array in pairs))
