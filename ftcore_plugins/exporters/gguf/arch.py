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

    gguf_arch: str                  # llama.cpp's name for it (general.architecture)
    interleave_rotary: bool = False # llama.cpp's "llama" rope pairs adjacent rows; HF pairs row i with i + d/2
    norm_shift: float = 0.0         # Gemma's RMSNorm scales by (1 + weight), llama.cpp's by the weight: add 1
    checks: tuple[Callable[[dict[str, Any]], str | None], ...] = ()   # each: None, or why it cannot be exported
    metadata: Callable[[Any, dict[str, Any]], None] | None = None       # keys beyond the common ones
    required_tokens: tuple[str, ...] = ()   # tokens llama.cpp looks up by text when it loads the vocabulary


def _no_sliding_window(hparams: dict[str, Any]) -> str | None:
    """llama.cpp's qwen2/qwen3/phi3 graphs attend to the whole context: a model that slides its window
    would compute something else beyond the window."""
    uses = hparams.get("use_sliding_window", hparams.get("sliding_window") is not None)
    if uses and hparams.get("sliding_window") and set(hparams.get("layer_types") or ["sliding_attention"]) != {
            "full_attention"}:
        return (f"uses sliding-window attention (sliding_window={hparams['sliding_window']}), which llama.cpp's "
                f"graph for it does not apply")
    return None


def _gemma_attention_scale(hparams: dict[str, Any]) -> str | None:
    """llama.cpp scales queries by 1/sqrt(head_dim) (hidden/heads for 46-layer models, as Gemma 2 27B);
    transformers by query_pre_attn_scalar**-0.5."""
    scalar = hparams.get("query_pre_attn_scalar")
    expected = (hparams["hidden_size"] // hparams["num_attention_heads"] if hparams["num_hidden_layers"] == 46
                else head_dim(hparams))
    if scalar is not None and scalar != expected:
        return (f"has query_pre_attn_scalar={scalar}, and llama.cpp scales queries by 1/sqrt({expected}) "
                f"for a model of this shape")
    return None


def _tied(hparams: dict[str, Any]) -> str | None:
    """llama.cpp's gemma2 has no output matrix of its own: it reuses the token embedding."""
    if hparams.get("tie_word_embeddings", True) is False:
        return "has an output matrix apart from its token embedding (tie_word_embeddings: false)"
    return None


def _gemma3_layout(hparams: dict[str, Any]) -> str | None:
    """llama.cpp's gemma3: every sixth layer global, local layers with rope base 10000 and no scaling."""
    types = hparams.get("layer_types") or []
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                for i in range(hparams["num_hidden_layers"])]
    if types and types != expected:
        return "has a pattern of sliding and global layers other than llama.cpp's (every sixth layer global)"
    local = layer_rope(hparams, "sliding_attention")
    if local.get("rope_type", "default") != "default":
        return f"scales the rope of its sliding-window layers ({local.get('rope_type')}), which llama.cpp does not"
    if hparams.get("final_logit_softcapping") or hparams.get("attn_logit_softcapping"):
        return "caps its logits, which llama.cpp's gemma3 graph does not"
    return None


def _gemma2_metadata(writer: Any, hparams: dict[str, Any]) -> None:
    writer.add_sliding_window(int(hparams.get("sliding_window") or 4096))
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if hparams.get(key) is not None:
            add(float(hparams[key]))


def _gemma3_metadata(writer: Any, hparams: dict[str, Any]) -> None:
    writer.add_sliding_window(int(hparams.get("sliding_window") or 4096))
    writer.add_rope_freq_base_swa(float(layer_rope(hparams, "sliding_attention")["rope_theta"]))


# Mistral is the Llama graph (llama.cpp converts MistralForCausalLM to "llama" too). Qwen2, Qwen3, Gemma and
# Phi-3 use llama.cpp's NEOX rope mode, the same half-split pairing as HF, so their rows stay as they are.
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", interleave_rotary=True),
    "mistral": Arch("llama", interleave_rotary=True),
    "qwen2": Arch("qwen2", checks=(_no_sliding_window,)),
    "qwen3": Arch("qwen3", checks=(_no_sliding_window,)),
    "gemma2": Arch("gemma2", norm_shift=1.0, checks=(_gemma_attention_scale, _tied), metadata=_gemma2_metadata),
    "gemma3_text": Arch("gemma3", norm_shift=1.0, checks=(_gemma_attention_scale, _gemma3_layout),
                        metadata=_gemma3_metadata),
    "phi3": Arch("phi3", checks=(_no_sliding_window,), required_tokens=("<|endoftext|>",)),
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
        hint = " (export the text model, Gemma3ForCausalLM)" if model_type == "gemma3" else ""
        raise ConfigError(f"gguf-export: {where} is a {model_type or 'unknown'!s} model "
                          f"({', '.join(hparams.get('architectures') or []) or 'no architectures listed'}){hint}; "
                          f"GGUF export supports: {supported()}.")
    rope = rope_parameters(hparams)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise ConfigError(f"gguf-export: {where} uses rope scaling {rope.get('rope_type')!r}; "
                          f"GGUF export supports rope types: {', '.join(ROPE_TYPES)}.")
    arch = ARCHS[model_type]
    for problem in filter(None, (c(hparams) for c in arch.checks)):
        raise ConfigError(f"gguf-export: {where} {problem}; llama.cpp would compute something else, "
                          f"so it is not exported.")
    return arch


def check_vocab(arch: Arch, tokens: list[str], where: str) -> None:
    """Refuse a vocabulary llama.cpp would fail to load for this architecture."""
    missing = [t for t in arch.required_tokens if t not in tokens]
    if missing:
        raise ConfigError(f"gguf-export: {where}: llama.cpp's {arch.gguf_arch} needs the token(s) "
                          f"{', '.join(missing)} in the vocabulary (every released model of that family has "
                          f"them); add them to the tokenizer and resize the embeddings, or export another model.")


PHI3_NAMES = ("phi3", "phi-3")
PHI3_KEPT = ("<unk>", "<s>", "<|endoftext|>")   # the special tokens llama.cpp's phi3 rule leaves alone


def file_name(arch: Arch, name: str, rstrip: dict[str, bool], where: str) -> str:
    """The model name to write (general.name), which llama.cpp also reads as a tokenizer setting.

    llama.cpp makes every special token of a phi3 file eat the whitespace after it (rstrip), except
    <unk>, <s> and <|endoftext|>, when and only when general.name contains "phi3" or "phi-3": released
    Phi-3 tokenizers are set up that way. The name is made to say what the tokenizer does.
    """
    if arch.gguf_arch != "phi3" or not rstrip:
        return name
    says_phi3 = any(n in name.lower() for n in PHI3_NAMES)
    phi_rule = all(strips == (token not in PHI3_KEPT) for token, strips in rstrip.items())
    if phi_rule and not says_phi3:
        return f"{name} (phi3)"
    if not any(rstrip.values()) and not says_phi3:
        return name
    if phi_rule:
        return name
    raise ConfigError(f"gguf-export: {where}: its special tokens strip the whitespace after them "
                      f"({', '.join(t for t, s in rstrip.items() if s) or 'none'}) in a way llama.cpp's phi3 "
                      f"tokenizer cannot follow (it strips after all of them but {', '.join(PHI3_KEPT)}, and only "
                      f"when the model's name contains phi3); the file would tokenize chats differently"
                      f"{'; choose a name without phi3/phi-3 (gguf-export.name)' if says_phi3 else ''}.")


def rope_parameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps rope settings in ``rope_parameters``; older configs in rope_theta/rope_scaling.

    For a model with per-layer-type rope (Gemma 3), the global layers' settings.
    """
    return layer_rope(hparams, "full_attention")


def layer_rope(hparams: dict[str, Any], layer_type: str) -> dict[str, Any]:
    """The rope settings of one kind of layer (``full_attention`` or ``sliding_attention``)."""
    params = dict(hparams.get("rope_parameters") or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    elif layer_type == "sliding_attention" and "rope_local_base_freq" in hparams:
        params = {"rope_theta": hparams["rope_local_base_freq"], "rope_type": "default"}
    legacy = (hparams.get("rope_scaling") or {}) if layer_type == "full_attention" else {}
    for key, value in legacy.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    params.setdefault("rope_theta", hparams.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def head_dim(hparams: dict[str, Any]) -> int:
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


def rotary_dims(hparams: dict[str, Any]) -> int:
    """How many of a head's dimensions rotate (Phi-3's partial_rotary_factor; all of them otherwise)."""
    factor = rope_parameters(hparams).get("partial_rotary_factor", hparams.get("partial_rotary_factor", 1.0))
    return int(head_dim(hparams) * float(factor or 1.0))


def write_metadata(writer: Any, arch: Arch, hparams: dict[str, Any], n_vocab: int) -> None:
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
    writer.add_rope_dimension_count(rotary_dims(hparams))
    if dim != hparams["hidden_size"] // n_head:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = rope_parameters(hparams)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if arch.metadata is not None:
        arch.metadata(writer, hparams)


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
    """The change a tensor needs for llama.cpp (row order, norm offset), or None."""
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        return lambda w: w + np.float32(arch.norm_shift)
    if not arch.interleave_rotary:
        return None
    n_head = hparams["num_attention_heads"]
    n_kv = hparams.get("num_key_value_heads") or n_head
    if ".self_attn.q_proj." in hf_name:
        return lambda w: interleave_rotary_rows(w, n_head)
    if ".self_attn.k_proj." in hf_name:
        return lambda w: interleave_rotary_rows(w, n_kv)
    return None
