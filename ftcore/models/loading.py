"""Loading models and tokenizers safely: safetensors only, no code from a model folder unless the user allows it.

Every ftcore command that loads a model goes through here (``load_pretrained_model``,
``load_pretrained_tokenizer``, ``load_base_model`` for the adapter plugins), so no command runs a
model folder's ``modeling_*.py`` or prompts for it: ``trust_remote_code`` is always passed
explicitly (transformers asks on the terminal when it is left unset). A folder that needs its own
code, or holds a damaged weights file, is a ConfigError naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftcore.errors import ConfigError

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


@contextlib.contextmanager
def loading_errors(folder: str | Path) -> Iterator[None]:
    """Turn what a user can fix about a model folder into a ConfigError that names the folder."""
    try:
        yield
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text or "custom code" in text:
            raise ConfigError(f"model folder {folder} needs code of its own to load (its config names custom classes "
                              f"in auto_map), and ftcore runs no code from a model folder unless you allow it: set "
                              f"model.trust_remote_code: true (--set model.trust_remote_code=true), only for a source "
                              f"you trust, and only for `ftcore run` and `ftcore prepare`.") from None
        if "Unrecognized model" in text or "does not recognize this architecture" in text:
            raise ConfigError(f"model folder {folder}: transformers does not know its architecture "
                              f"({text.splitlines()[0]}).") from None
        raise
    except Exception as exc:   # noqa: BLE001 - safetensors raises its own error type for a damaged file
        if type(exc).__name__ == "SafetensorError" or "deserializing header" in str(exc):
            raise ConfigError(f"model folder {folder}: a weights file is damaged or incomplete ({exc}); copy or "
                              f"download the model again.") from None
        raise


def load_pretrained_model(folder: str | Path, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` of a local folder: safetensors only, remote code only when asked."""
    from transformers import AutoModelForCausalLM

    with loading_errors(folder):
        return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                                    use_safetensors=True, **kwargs)


def load_pretrained_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained`` of a local folder, remote code only when asked."""
    from transformers import AutoTokenizer

    with loading_errors(folder):
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def load_base_model(model_path: str, tokenizer: Any, config: Any, ctx: Any, quantized_on_load: bool = False,
                    vocab_multiple: int | None = None, **kwargs: Any) -> Any:
    """Load safely (safetensors, no remote code unless configured) and fit embeddings to the tokenizer.

    ``vocab_multiple``: where the tokenizer outgrew the embeddings (a format added tokens), give them a
    multiple of this many rows (64 suits GPU matrix kernels). Only for a model saved whole (its config.json
    carries the size): an adapter must load onto its base resized to ``len(tokenizer)``, as PEFT's users do.

    ``quantized_on_load``: the weights are converted (quantized) as they load and the checkpoint
    is never needed again. Then the checkpoint is read tensor by tensor instead of memory-mapped
    (mapped, every page of the file that loading touches stays in the process's resident set
    until the last tensor is loaded), and the full-precision buffers freed after converting
    each tensor go back to the system (see ``large_buffers_unmapped``).
    """
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch_dtype(config, ctx))
    state = read_checkpoint(model_path) if quantized_on_load and not config.model.trust_remote_code else None
    with large_buffers_unmapped(quantized_on_load), loading_errors(model_path):
        model = load_from_state(model_path, state, **kwargs) if state is not None else None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, trust_remote_code=config.model.trust_remote_code, use_safetensors=True, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=vocab_multiple)
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

    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
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
    fixed by the environment, or a lower one fixed before (``fix_mmap_threshold``), is left as it is.
    """
    libc = _glibc() if active else None
    if libc is not None:
        fix_mmap_threshold(MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)


_FIXED: int | None = None   # the mmap threshold this process fixed (glibc cannot go back to its dynamic one)


def fix_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold at ``nbytes``, or keep a lower one this process fixed before: from then on a
    freed buffer of that size or more goes back to the system at once instead of staying in the heap.

    glibc raises its threshold to the largest block freed so far (up to 32 MiB), so a process that allocates
    and frees large buffers over and over (quantizing a model as it loads, FSDP gathering and freeing layers)
    keeps what it freed. The threshold stays fixed for the rest of the process; large allocations then cost a
    fresh mapping each (slower where they are many). A threshold the environment fixes
    (``MALLOC_MMAP_THRESHOLD_``, or ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``) is the user's choice
    and is left alone, as is any libc but glibc. Returns whether a threshold of ftcore's is in force."""
    global _FIXED
    if mmap_threshold_set_by_user():
        return False
    libc = _glibc()
    if libc is None:
        return False
    if _FIXED is not None and _FIXED <= nbytes:
        return True
    if not libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)):
        return False
    _FIXED = int(nbytes)
    return True


def mmap_threshold_set_by_user() -> bool:
    """True where the environment fixes glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``, or
    ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``): that choice is kept."""
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
