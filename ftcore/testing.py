"""Helpers for testing ftcore plugins: tiny models, format checks, and a finished run to export.

Everything is built locally (no hub): a byte-level BPE tokenizer trained in-process
and a Llama-architecture model with random weights, saved to a folder and loaded
back through the same ``from_pretrained`` path a user's model takes.

This module is for tests: nothing in ftcore imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftcore.data.labels import IGNORE_INDEX, tokenize
from ftcore.data.show import render_marked
from ftcore.models.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, build_model, build_tokenizer, tiny_model
from ftcore.registry.resolution import resolve
from ftcore.registry.selection import select
from ftcore.types import Example, RunContext

__all__ = ["CHATML_TEMPLATE", "SPECIAL_TOKENS", "build_model", "build_tokenizer", "tiny_model", "check_example",
           "supervised_text", "render_supervision", "format_config", "check_format", "finished_run", "run_exporter"]

def check_example(example: Example, tokenizer: Any, strict_boundaries: bool = False) -> list[int]:
    """Check that a format plugin's Example is well formed; return its labels.

    Raises AssertionError when the text is empty, spans fall outside the text, are empty,
    overlap or are out of order, when labels are not aligned with the tokens or differ
    from them, or when no token ends up supervised. With ``strict_boundaries`` a token
    that straddles a span boundary (partly supervised text) is an error too.
    """
    assert isinstance(example, Example), f"expected ftcore.Example, got {type(example).__name__}"
    assert isinstance(example.text, str) and example.text, "the example's text is empty"
    last = 0
    for span in example.supervised:
        assert len(span) == 2 and all(isinstance(x, int) for x in span), f"span {span!r} is not (start, end)"
        start, end = span
        assert 0 <= start < end <= len(example.text), f"span ({start}, {end}) is empty or outside the text"
        assert start >= last, f"supervised span ({start}, {end}) overlaps the previous one or is out of order"
        last = end
    enc = tokenizer(example.text, add_special_tokens=example.add_special_tokens, return_offsets_mapping=True)
    ids, labels = tokenize(example, tokenizer)
    assert ids == list(enc["input_ids"]), "the tokens differ from the tokenizer's own encoding of the text"
    assert len(ids) == len(labels), "labels are not aligned with input ids"
    assert all(lab in (tok, IGNORE_INDEX) for tok, lab in zip(ids, labels)), "a label differs from its token"
    assert any(lab != IGNORE_INDEX for lab in labels), "no token is supervised: the example would teach nothing"
    if strict_boundaries:
        for (start, end), lab in zip(enc["offset_mapping"], labels):
            for s_start, s_end in example.supervised:
                cut = start < s_start < end or start < s_end < end
                assert not cut, (f"token {example.text[start:end]!r} at ({start}, {end}) straddles the boundary of "
                                 f"supervised span ({s_start}, {s_end}): part of it is trained on")
    return labels


def supervised_text(example: Example, tokenizer: Any) -> str:
    """Decode exactly the supervised tokens of an example (for masking tests)."""
    ids, labels = tokenize(example, tokenizer)
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)


def render_supervision(example: Example, tokenizer: Any) -> str:
    """The example as text with its supervised tokens in ``[[...]]`` (what ``ftcore prepare --show`` prints)."""
    return render_marked(*tokenize(example, tokenizer), tokenizer)


def format_config(plugins: list[Any] | tuple = (), names: list[str] | tuple = (), **sections: Any) -> Any:
    """A validated RunConfig for calling a format plugin's hooks directly in a test.

    ``plugins`` are plugin objects (your module), ``names`` installed plugins by entry-point
    name, ``sections`` config sections, e.g. ``format_config([my_plugin], my_plugin={"x": 1})``.
    """
    config, _ = resolve({"model": "unused", "plugins": list(names), **sections}, plugin_objects=plugins,
                        log=lambda m: None)
    return config


def check_format(plugin: Any, record: dict[str, Any], tokenizer: Any, config: Any = None,
                 strict_boundaries: bool = False) -> tuple[Example, list[int]]:
    """Validate one good record with a format plugin, render it, and check the result.

    Returns ``(example, labels)``. Fails when the plugin reports problems with the record
    or renders a malformed example (see :func:`check_example`).
    """
    config = config if config is not None else format_config([plugin])
    chosen = select([], [plugin])
    name = chosen.names("format")[0] if chosen.names("format") else None
    assert name, f"{plugin!r} implements no ftcore_format_record hook: it is not a format plugin"
    ctx = RunContext(config=config, plugins=chosen, output_dir=Path(config.output_dir), log=lambda m: None,
                     tokenizer=tokenizer)
    problems = chosen.call_one(name, "ftcore_validate_record", record=record, config=config, ctx=ctx) or []
    assert not problems, f"the plugin rejected a record expected to be good: {problems}"
    example = chosen.call_one(name, "ftcore_format_record", record=record, tokenizer=tokenizer, config=config,
                              ctx=ctx)
    return example, check_example(example, tokenizer, strict_boundaries)


# -- exporters ------------------------------------------------------------------------------

def finished_run(folder: str | Path, method: str = "lora", plugins: list[str] | tuple = ("alpaca",),
                 model: str | Path | None = None, settings: dict[str, Any] | None = None,
                 metrics: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A finished run's output folder, made without training, to test an exporter against.

    It holds what a run leaves: ftcore-run.json, config.yaml, plugins.json, metrics.jsonl,
    summary.json and ``adapter/`` (``method="lora"``: a PEFT LoRA adapter whose weights are random
    and non-zero, so merging it changes the model) or ``model/`` (``method="full"``: the base with
    perturbed weights). The base is a tiny model built in ``folder/base`` unless ``model`` is given.
    ``settings``: config keys the run had (e.g. ``{"training": {"learning_rate": 1e-4}}``); ``metrics``:
    final metrics in its summary.json, over made-up ones (``eval_loss`` 2.1, ``steps`` 3).
    """
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcore import runfolder
    from ftcore.files import write_json_atomic, write_text_atomic
    from ftcore.version import __version__

    root = Path(folder)
    base = Path(model) if model is not None else tiny_model(root / "base")
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    raw = {**(settings or {}), "model": str(base), "plugins": [method, *plugins], "output_dir": str(run)}
    config, chosen = resolve(raw, log=lambda m: None)
    import yaml

    write_text_atomic(run / runfolder.CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))
    write_json_atomic(run / runfolder.PLUGINS, chosen.versions())
    write_json_atomic(run / runfolder.MARKER, {"ftcore_version": __version__, "precision": "fp32"})
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if method == "full":
        saved = run / runfolder.MODEL
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        net.save_pretrained(str(saved))
    else:
        saved = run / runfolder.ADAPTER
        lora = config.section("lora")
        peft_model = get_peft_model(net, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                                                    task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn_like(param) * 0.05)
        peft_model.save_pretrained(str(saved))
    tokenizer.save_pretrained(str(saved))
    rows = [{"step": s, "epoch": s / 3, "loss": 3.0 - 0.5 * s, "learning_rate": 2e-4} for s in (1, 2, 3)]
    rows.append({"step": 3, "epoch": 1.0, "eval_loss": 2.1})
    (run / runfolder.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = {"output_dir": str(run), "model_dir": str(saved), "config_path": str(run / runfolder.CONFIG),
               "metrics_path": str(run / runfolder.METRICS), "report_path": None, "exports": [],
               "metrics": {"steps": 3, "epochs": 1.0, "train_loss": 1.5, "eval_loss": 2.1, "eval_loss_start": 3.2,
                           **(metrics or {})},
               "data_stats": {"records": 12, "train_examples": 10, "eval_examples": 2, "tokens": 480,
                              "supervised_tokens": 120},
               "plugins": chosen.versions(), "base_model_license": None, "export_errors": []}
    write_json_atomic(run / runfolder.SUMMARY, summary)
    return run


def run_exporter(exporter: Any, run_dir: str | Path, output: str | Path | None = None,
                 settings: dict[str, Any] | None = None, overwrite: bool = False,
                 log: Any = lambda message: None) -> list[Path]:
    """Run one exporter on a finished run exactly as ``ftcore export`` does; return the paths it wrote.

    ``exporter``: an installed exporter's name, or the plugin object (your module). ``settings``:
    config sections, e.g. ``{"my-exporter": {"quality": 3}}`` (what ``--set`` gives).
    """
    from ftcore.tools.export import export

    if isinstance(exporter, str):
        return export(str(run_dir), str(output) if output else None, [exporter], sets=settings,
                      overwrite=overwrite, log=log)
    return export(str(run_dir), str(output) if output else None, [], sets=settings, overwrite=overwrite,
                  plugin_objects=[exporter], log=log)

