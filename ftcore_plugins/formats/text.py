"""Plain text for continued pretraining and completion data: every token supervised, EOS after each document.

Records hold the document in a field (``text`` by default, ``text.field``); plain ``.txt`` files give one
document per file or one per blank-line-separated block (the dataset's ``txt_documents``). A document longer
than ``data.max_length`` tokens is split into consecutive chunks, each trained (``text.long_documents``),
and the examples are packed like supervised data.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

import ftcore

NAME = "text"


class TextConfig(ftcore.PluginConfig):
    EXAMPLES: ClassVar[list[tuple[str, dict[str, Any]]]] = [
        ("records `{content: ...}`, long documents truncated (data.too_long) instead of split",
         {"field": "content", "long_documents": "truncate"}),
    ]
    field: str = Field("text", min_length=1, description="Record field holding the document (.txt files give "
                       "their documents in `text`).")
    add_eos: bool = Field(True, description="Append the tokenizer's EOS token after each document (supervised), "
                          "so packed documents are separated and the model learns where one ends.")
    long_documents: Literal["split", "truncate"] = Field(
        "split", description="A document longer than data.max_length tokens: `split` into consecutive chunks of "
        "max_length tokens, each an example (nothing is lost); `truncate` follows data.too_long (truncate or drop).")


@ftcore.hookimpl
def ftcore_config_schema():
    return TextConfig


@ftcore.hookimpl
def ftcore_validate_record(record: dict[str, Any], config: Any) -> list[tuple[str, str]]:
    key = config.section(NAME).field
    if key not in record or record[key] is None:
        names = ", ".join(str(k) for k in list(record)[:8]) or "no fields"
        return [(key, f'missing required field "{key}" (the document); the record has {names}. Set text.field '
                      f"to the field holding the text.")]
    if not isinstance(record[key], str):
        return [(key, f"expected a string, got {type(record[key]).__name__}")]
    if not record[key].strip():
        return [(key, "is empty: nothing to learn")]
    return []


@ftcore.hookimpl
def ftcore_format_record(record: dict[str, Any], tokenizer: Any, config: Any) -> ftcore.Example:
    cfg: TextConfig = config.section(NAME)
    text = record[cfg.field] + (tokenizer.eos_token if cfg.add_eos and tokenizer.eos_token else "")
    return ftcore.Example(text, [(0, len(text))], add_special_tokens=True,
                          split_long=cfg.long_documents == "split")
