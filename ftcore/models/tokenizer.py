"""Loading a model's tokenizer for training: a fast (Rust) tokenizer, with a pad token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftcore.errors import ConfigError
from ftcore.models.loading import load_pretrained_tokenizer


def load_tokenizer(model_path: Path, trust_remote_code: bool = False) -> Any:
    """The model folder's tokenizer; ftcore needs a fast one for exact label masks (offsets)."""
    try:
        tok = load_pretrained_tokenizer(model_path, trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model folder {model_path}: no usable tokenizer ({exc}).") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"model folder {model_path}: ftcore needs a fast (tokenizers) tokenizer for exact "
                          f"label masking; this one is {type(tok).__name__}.")
    if tok.pad_token is None:
        # A common case (Llama, Mistral): pad with EOS; labels mask padding, so it is never learned.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok
