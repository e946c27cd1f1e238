"""Model loading shared by the bundled adapter plugins (not a plugin itself)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(config: Any, ctx: Any) -> Any:
    import torch

    name = config.model.dtype
    if name == "auto":
        name = DTYPES.get(ctx.precision, "float32")
    return getattr(torch, name)


def read_checkpoint(model_path: str) -> dict[str, Any] | None:
    """The tensors of a local safetensors checkpoint, each read from the file when loaded, never mapped.

    None where ``model_path`` is not a local folder of safetensors files (a hub id, a .bin
    checkpoint) or this safetensors cannot read without mapping: the caller loads as usual.
    """
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    try:
        handles = [safe_open(str(folder / name), framework="pt", device="cpu", backend="pread") for name in files]
    except TypeError:   # safetensors before 0.7: no pread backend
        return None
    return {key: handle.get_slice(key) for handle in handles for key in handle.keys()}


def load_base_model(model_path: str, tokenizer: Any, config: Any, ctx: Any, quantized_on_load: bool = False,
                    **kwargs: Any) -> Any:
    """Load safely (safetensors, no remote code unless configured) and fit embeddings to the tokenizer.

    ``quantized_on_load``: the weights are converted (quantized) as they load and the checkpoint
    is never needed again. Then the checkpoint is read tensor by tensor instead of memory-mapped
    (mapped, every page of the file that loading touches stays in the process's resident set
    until the last tensor is loaded), and the full-precision buffers freed after converting
    each tensor go back to the system (see ``large_buffers_unmapped``).
    """
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch_dtype(config, ctx))
    state = read_checkpoint(model_path) if quantized_on_load and not config.model.trust_remote_code else None
    with large_buffers_unmapped(quantized_on_load):
        model = load_from_state(model_path, state, **kwargs) if state is not None else None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, trust_remote_code=config.model.trust_remote_code, use_safetensors=True, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    return model


def load_from_state(model_path: str, state: dict[str, Any], **kwargs: Any) -> Any:
    """``from_pretrained`` of the model in ``model_path`` with its weights taken from ``state``.

    None where transformers has no causal-LM class for the model's config.
    """
    from pathlib import Path

    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    model_config = AutoConfig.from_pretrained(model_path)
    if type(model_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return None
    if (Path(model_path) / "generation_config.json").is_file():
        kwargs.setdefault("generation_config", GenerationConfig.from_pretrained(model_path))
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)].from_pretrained(
        None, config=model_config, state_dict=state, **kwargs)
    model.config.name_or_path = model.name_or_path = model_path   # as from_pretrained(model_path) sets them
    return model


M_MMAP_THRESHOLD = -3                 # glibc mallopt() parameter
MMAP_THRESHOLD = 4 << 20              # buffers from 4 MiB up get their own mapping, unmapped when freed


@contextlib.contextmanager
def large_buffers_unmapped(active: bool = True) -> Iterator[None]:
    """From here on, give large freed buffers back to the system at once (glibc only); trim after loading.

    glibc raises its mmap threshold (up to 32 MiB) after the first large free, so later large
    buffers come from the heap. Quantizing on load, the read and upcast buffers of each tensor
    then sit between the small quantized tensors that are kept: the heap cannot shrink, and
    loading a 290M model left about 450 MiB of freed memory resident; in training the same
    happens to the per-layer dequantized weights. A fixed 4 MiB threshold makes each large
    buffer its own mapping, unmapped when freed. It stays set for the rest of the process (glibc
    cannot go back to its dynamic threshold); large buffers then cost a page fault per 4 KiB
    page on first use, which was not measurable against a training step on a CPU. A threshold
    fixed by the environment (MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES) is left as it is.
    """
    libc = _glibc() if active else None
    if libc is not None and not threshold_set_by_user():
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)


def threshold_set_by_user() -> bool:
    """True where the environment already fixes glibc's mmap threshold: that choice is kept."""
    import os

    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")


def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
