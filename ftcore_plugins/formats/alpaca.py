"""Alpaca instruction records {instruction, input, output}, classic prompt, response-only loss.

The three field names are settings, so other instruction datasets load without code, e.g. Dolly's
``instruction/context/response`` with ``alpaca: {input_field: context, output_field: response}``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

import ftcore

NAME = "alpaca"
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class AlpacaConfig(ftcore.PluginConfig):
    EXAMPLES: ClassVar[list[tuple[str, dict[str, Any]]]] = [
        ("Dolly-style records `{instruction, context, response}`, with settings alone",
         {"instruction_field": "instruction", "input_field": "context", "output_field": "response"}),
    ]
    train_on_inputs: bool = Field(False, description="Supervise the prompt too, not only the response.")
    prompt: str = Field(PROMPT, description="Template with {instruction} and {input}.")
    prompt_no_input: str = Field(PROMPT_NO_INPUT, description="Template used when input is empty.")
    add_eos: bool = Field(True, description="Append the tokenizer's EOS token (supervised).")
    instruction_field: str = Field("instruction", min_length=1, description="Record field holding the instruction "
                                   "(Dolly: `instruction`).")
    input_field: str = Field("input", min_length=1, description="Record field holding the optional input (Dolly: "
                             "`context`).")
    output_field: str = Field("output", min_length=1, description="Record field holding the answer (Dolly: "
                              "`response`).")

    @field_validator("prompt", "prompt_no_input")
    @classmethod
    def _needs_fields(cls, value: str, info: Any) -> str:
        keys = ("{instruction}", "{input}") if info.field_name == "prompt" else ("{instruction}",)
        for key in keys:
            if key not in value:
                raise ValueError(f"the template must contain {key}")
        try:
            value.format(instruction="", input="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"the template may only use {{instruction}} and {{input}} "
                             f"(write a literal brace as {{{{ or }}}}): {exc!r}") from None
        return value


@ftcore.hookimpl
def ftcore_config_schema():
    return AlpacaConfig


@ftcore.hookimpl
def ftcore_validate_record(record: dict[str, Any], config: Any) -> list[tuple[str, str]]:
    cfg = _settings(config)
    instruction, given, output = cfg.instruction_field, cfg.input_field, cfg.output_field
    problems = []
    for key, required in ((instruction, True), (given, False), (output, True)):
        if key not in record or record[key] is None:
            if required:
                renamed = "" if (instruction, output) == ("instruction", "output") else \
                    f" (alpaca.instruction_field: {instruction}, alpaca.output_field: {output})"
                problems.append((key, f'missing required field "{key}": alpaca records need an instruction and an '
                                      f'output{renamed}; the record has {_keys(record)}. Set alpaca.instruction_field '
                                      f'/ input_field / output_field to the names your data uses.'))
            continue
        if not isinstance(record[key], str):
            problems.append((key, f"expected a string, got {type(record[key]).__name__}"))
    if not problems and not record[output].strip():
        problems.append((output, "is empty: nothing to learn"))
    return problems


def _settings(config: Any) -> AlpacaConfig:
    """The alpaca section; its defaults where there is none (another plugin reusing this validation)."""
    try:
        return config.section(NAME)
    except (AttributeError, KeyError):
        return AlpacaConfig()


def _keys(record: dict[str, Any]) -> str:
    names = [str(k) for k in record][:8]
    return "fields " + ", ".join(names) + (", ..." if len(record) > 8 else "") if names else "no fields"


@ftcore.hookimpl
def ftcore_format_record(record: dict[str, Any], tokenizer: Any, config: Any) -> ftcore.Example:
    cfg: AlpacaConfig = config.section(NAME)
    given = record.get(cfg.input_field) or ""
    template = cfg.prompt if given.strip() else cfg.prompt_no_input   # the Input block only when there is input
    prompt = template.format(instruction=record[cfg.instruction_field], input=given)
    response = record[cfg.output_field] + (tokenizer.eos_token if cfg.add_eos and tokenizer.eos_token else "")
    return ftcore.Example.from_segments([(prompt, cfg.train_on_inputs), (response, True)],
                                        add_special_tokens=True)
