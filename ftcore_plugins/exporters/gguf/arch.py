"""What each supported architecture looks like to llama.cpp: metadata keys and tensor layout.

Only architectures whose conversion is proven by the tests are listed; any other
model is refused before anything is loaded, merged or written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftcore import ConfigError


@dataclass(frozen=True)
class Arch:
    """How one transformers ``model_type`` maps onto a llama.cpp architecture."""

    gguf_arch: str          # llama.cpp's name for it (general.architecture)
    interleave_rotary: bool # llama.cpp's "llama" rope pairs adjacent rows; HF pairs row i with i + d/2


# Mistral is the Llama graph (llama.cpp converts MistralForCausalLM to "llama" too); Qwen2 uses
# llama.cpp's NEOX rope mode, the same half-split pairing as HF, so its rows stay as they are.
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", interleave_rotary=True),
    "mistral": Arch("llama", interleave_rotary=True),
    "qwen2": Arch("qwen2", interleave_rotary=False),
}
ROPE_TYPES = ("default", "linear", "llama3")


def supported() -> str:
    return ", ".join(ARCHS)


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json, so it is not a transformers model folder to export.")
    return json.loads(path.read_text(encoding="utf-8"))


def check(hparams: dict[str, Any], where: str) -> Arch:
    """The Arch for a model config, or a ConfigError naming the supported ones."""
    model_type = hparams.get("model_type")
    if model_type not in ARCHS:
        raise ConfigError(f"gguf-export: {where} is a {model_type or 'unknown'!s} model "
                          f"({', '.join(hparams.get('architectures') or []) or 'no architectures listed'}); "
                          f"GGUF export supports: {supported()}.")
    rope = rope_parameters(hparams)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise ConfigError(f"gguf-export: {where} uses rope scaling {rope.get('rope_type')!r}; "
                          f"GGUF export supports rope types: {', '.join(ROPE_TYPES)}.")
    return ARCHS[model_type]


def rope_parameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps rope settings in ``rope_parameters``; older configs in rope_theta/rope_scaling."""
    params = dict(hparams.get("rope_parameters") or {})
    legacy = hparams.get("rope_scaling") or {}
    for key, value in legacy.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    params.setdefault("rope_theta", hparams.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def head_dim(hparams: dict[str, Any]) -> int:
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


def write_metadata(writer: Any, hparams: dict[str, Any], n_vocab: int) -> None:
    """The architecture keys llama.cpp reads for these models."""
    import gguf

    n_head = hparams["num_attention_heads"]
    dim = head_dim(hparams)
    writer.add_context_length(hparams.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(hparams.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_rms_eps(hparams.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(n_vocab)
    writer.add_rope_dimension_count(dim)
    if dim != hparams["hidden_size"] // n_head:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = rope_parameters(hparams)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def llama3_rope_factors(hparams: dict[str, Any]) -> np.ndarray | None:
    """Per-frequency divisors for Llama 3.1-style rope scaling (llama.cpp reads them as rope_freqs)."""
    rope = rope_parameters(hparams)
    if rope["rope_type"] != "llama3":
        return None
    dim = head_dim(hparams)
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * float(rope["rope_theta"]) ** (i / dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def interleave_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's half-split rotary layout to llama.cpp's adjacent pairs.

    Within a head of size d, HF rotates row i together with row i + d/2; llama.cpp's
    "llama" rope rotates rows 2i and 2i+1. Works for weights (rows, cols) and biases (rows,).
    """
    half = weight.shape[0] // n_heads // 2
    split = weight.reshape(n_heads, 2, half, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def tensor_transform(hf_name: str, arch: Arch, hparams: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray] | None:
    """The layout change a tensor needs for llama.cpp, or None."""
    if not arch.interleave_rotary:
        return None
    n_head = hparams["num_attention_heads"]
    n_kv = hparams.get("num_key_value_heads") or n_head
    if ".self_attn.q_proj." in hf_name:
        return lambda w: interleave_rotary_rows(w, n_head)
    if ".self_attn.k_proj." in hf_name:
        return lambda w: interleave_rotary_rows(w, n_kv)
    return None
