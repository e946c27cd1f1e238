"""Validating a layered configuration: the core sections and each selected plugin's section.

Validation happens before any model or data is loaded. Every error names the key (dotted),
says what is wrong, and suggests the closest valid key when one is close.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from ftcore.config.schema import CORE_KEYS, RunConfig
from ftcore.errors import ConfigError, suggest


def validate(raw: dict[str, Any], schemas: dict[str, type[BaseModel]],
             installed: list[str] = ()) -> RunConfig:
    """Validate the core sections and each selected plugin's section.

    ``schemas`` maps section names to the plugin schema that owns them.
    """
    core = {k: v for k, v in raw.items() if k in CORE_KEYS}
    rest = {k: v for k, v in raw.items() if k not in CORE_KEYS}
    unknown = [k for k in rest if k not in schemas]
    if unknown:
        key = unknown[0]
        if key in installed:
            raise ConfigError(
                f'config section "{key}" belongs to plugin "{key}", which this run does not use. '
                f"Add it to --plugins / plugins:, or remove the section."
            )
        raise ConfigError(f'unknown config key "{key}".{suggest(key, [*CORE_KEYS, *schemas])} '
                          f"Valid top-level keys: {', '.join([*CORE_KEYS, *schemas])}.")
    if "model" not in core:
        raise ConfigError("no model given: pass --model PATH or set model: in the config file.")
    try:
        config = RunConfig.model_validate(core)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, RunConfig)) from None
    for name, schema in schemas.items():
        section = rest.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f'config section "{name}" must be a mapping, got {section!r}.')
        try:
            config._sections[name] = schema.model_validate(section)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, schema, prefix=name)) from None
    return config


def format_validation_error(exc: ValidationError, schema: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join([prefix, *loc] if prefix else loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(schema, loc[:-1])
            hint = suggest(loc[-1], valid)
            lines.append(f'unknown config key "{key}".{hint} Valid keys here: {", ".join(valid)}.')
        elif err["type"] == "missing":
            lines.append(f'config key "{key}" is required.')
        else:
            lines.append(f'config key "{key}": {err["msg"]} (got {err.get("input")!r}).')
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _fields_at(schema: type[BaseModel], path: list[str]) -> list[str]:
    model: Any = schema
    for part in path:
        if part.isdigit():
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _inner_model(field.annotation)
    return list(getattr(model, "model_fields", {}))


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None
