"""Export the fine-tuned model to a GGUF file for llama.cpp, with an Ollama Modelfile next to it.

From a LoRA/QLoRA run the adapter is first merged into the unquantized base (through
the run's adapter plugin, hook ``ftcore_merge_adapter``); a full fine-tune is read
straight from its safetensors. Tensor types (``gguf-export.quant``): f32, f16, bf16, q8_0, q4_0 written
by the gguf package; the k-quants q4_k_m, q5_k_m, q6_k made from an f16/bf16 file by llama.cpp's quantizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

import ftcore
from ftcore import ConfigError, PluginError

NAME = "gguf-export"


class GgufExportConfig(ftcore.PluginConfig):
    quant: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] = Field(
        "q8_0", description="Tensor type of the matrices (norms and biases stay f32); q4_k_m, q5_k_m and q6_k "
                            "are made by llama.cpp's quantizer and need llama-cpp-python.")
    output: str | None = Field(None, description="The .gguf file to write; default RUN/gguf/NAME-QUANT.gguf.")
    name: str | None = Field(None, description="Model name in the file's metadata; default the run folder's name.")
    modelfile: bool = Field(True, description="Write an Ollama Modelfile next to the GGUF file.")
    adapter: bool = Field(False, description=(
        "Write a LoRA run's adapter as a GGUF adapter file (NAME-lora-f16.gguf) that llama.cpp applies to the base "
        "model's GGUF (--lora, lora_path, Ollama's ADAPTER) instead of a merged model."))
    base_gguf: str | None = Field(None, description=(
        "With adapter: the base model's GGUF file the adapter goes with; default: ftcore writes it "
        "(BASE-QUANT.gguf next to the adapter file)."))
    parity: bool = Field(True, description="After writing, generate greedily from a few prompts with transformers "
                                           "and llama.cpp and record how far they agree (needs llama-cpp-python).")
    parity_prompts: list[str] = Field(default_factory=list, description=(
        "Prompts (user messages, put through the chat template if there is one) for the parity check; default: "
        "the run's held-out prompts, else three built-in ones."))
    parity_tokens: int = Field(24, ge=1, le=512, description="Tokens generated per prompt in the parity check.")
    parity_min_agreement: float | None = Field(None, ge=0.0, le=1.0, description=(
        "Least token agreement that passes; default by quant (f32 1.0, f16/bf16/q8_0 0.95, q6_k 0.9, q5_k_m 0.85, "
        "q4_k_m/q4_0 0.8)."))

    @field_validator("parity_prompts", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


@ftcore.hookimpl
def ftcore_config_schema():
    return GgufExportConfig


@ftcore.hookimpl
def ftcore_run_started(config: Any, ctx: Any) -> None:
    """Refuse an unsupported architecture or an occupied output file before training, not after."""
    from ftcore_plugins.exporters.gguf import arch, kquant

    base = ctx.model_path if ctx.model_run is not None else \
        ftcore.resolve_model_path(config.model.path, ctx.log, revision=config.model.revision)
    arch.check(arch.read_config(base), str(base))
    settings: GgufExportConfig = config.section(NAME)
    kquant.require(settings.quant)
    if settings.adapter and not ctx.plugins.hook.ftcore_merge_adapter.get_hookimpls():
        raise ConfigError("gguf-export.adapter: true writes a LoRA adapter, and this run trains no adapter "
                          f"({', '.join(ctx.plugins.names('adapter')) or 'no adapter plugin'}); set it to false.")
    if settings.adapter and settings.base_gguf and not Path(settings.base_gguf).is_file():
        raise ConfigError(f"gguf-export.base_gguf: {settings.base_gguf} does not exist.")
    output, _ = output_and_name(settings, Path(ctx.output_dir), None)
    written = adapter_outputs(settings, output, base)[: 1 if settings.base_gguf else 2] if settings.adapter else [output]
    for path in written:
        _check_free(path, output.parent / "Modelfile" if settings.modelfile else None, config.overwrite)


@ftcore.hookimpl
def ftcore_export(run_dir: Path, model_dir: Path, config: Any, ctx: Any) -> list[Path]:
    settings: GgufExportConfig = config.section(NAME)
    output, name = output_and_name(settings, Path(run_dir), ctx.export_output)
    source = Path(model_dir)
    if ctx.merged_dir is not None and (source / "adapter_config.json").is_file():
        ctx.log(f"gguf-export: using the merged model in {ctx.merged_dir}")
        source = Path(ctx.merged_dir)   # merged once already, by the merge exporter: no second merge
    details: dict[str, Any] = {}
    # the model was a finished run: the folder it resolved to is the base
    base, revision = ((str(ctx.model_path), None) if ctx.model_run is not None
                      else (config.model.path, config.model.revision))
    if settings.adapter:
        written = export_lora_gguf(Path(model_dir), output, settings, base=base,
                                   revision=revision, overwrite=config.overwrite, log=ctx.log, parity=parity_request(settings, ctx.result),
                                   details=details)
    else:
        written = export_gguf(source, output, quant=settings.quant, name=name, modelfile=settings.modelfile,
                              overwrite=config.overwrite, base=base, revision=revision,
                              merge=_merger(ctx), log=ctx.log,
                              parity=parity_request(settings, ctx.result), details=details)
    if details:
        if ctx.result is not None:
            ctx.result.export_details[NAME] = details
        report_parity(details, strict=config.strict_exports, log=ctx.log)
    return written


def adapter_outputs(settings: GgufExportConfig, output: Path, base: Path) -> list[Path]:
    """The adapter file and (unless ``base_gguf`` names one) the base's GGUF file, in the same folder."""
    kind = "f32" if settings.quant == "f32" else "f16"
    suffix = f"-{settings.quant}"
    adapter = (output.with_name(f"{output.stem.removesuffix(suffix)}-lora-{kind}.gguf")
               if output.stem.endswith(suffix) else output)   # a default name says the adapter's type instead
    base_file = Path(settings.base_gguf) if settings.base_gguf else output.with_name(
        f"{Path(base).name}-{settings.quant}.gguf")
    return [adapter, base_file]


def export_lora_gguf(adapter_dir: Path, output: Path, settings: GgufExportConfig, *, base: str | None,
                     revision: str | None = None, overwrite: bool = False, log: Callable[[str], None] = print, parity: Any = None,
                     details: dict[str, Any] | None = None) -> list[Path]:
    """Write the adapter in ``adapter_dir`` as a GGUF adapter file, with the base's GGUF beside it (unless
    ``settings.base_gguf`` names one) and a Modelfile that puts them together; return the paths written."""
    from transformers import AutoTokenizer

    from ftcore_plugins.exporters.gguf import adapter as adapter_mod
    from ftcore_plugins.exporters.gguf import arch as arch_mod
    from ftcore_plugins.exporters.gguf import modelfile as mf

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"gguf-export.adapter: {adapter_dir} is not a LoRA adapter folder (no "
                          f"adapter_config.json); a full fine-tune is exported whole (gguf-export.adapter: false).")
    base_path = ftcore.resolve_model_path(base, log, revision=revision) if base else _adapter_base(adapter_dir, log)
    hparams = arch_mod.read_config(base_path)
    arch = arch_mod.check(hparams, str(base_path))
    pairs = adapter_mod.tensors(adapter_dir, adapter_mod.read_config(adapter_dir), arch, hparams)  # refused early
    adapter_file, base_file = adapter_outputs(settings, output, base_path)
    modelfile_path = adapter_file.parent / "Modelfile"
    _check_free(adapter_file, modelfile_path if settings.modelfile else None, overwrite)
    if settings.base_gguf and not base_file.is_file():
        raise ConfigError(f"gguf-export.base_gguf: {base_file} does not exist.")
    written = []
    if not settings.base_gguf:
        written += export_gguf(base_path, base_file, quant=settings.quant, modelfile=False, overwrite=overwrite,
                               log=log)
    kind = "f32" if settings.quant == "f32" else "f16"
    name = settings.name or adapter_file.stem
    written.append(adapter_mod.write(adapter_dir, pairs, adapter_file, arch, kind, name, log))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=False)
    if settings.modelfile:
        text = mf.modelfile_text(base_file, tokenizer, drop_bos=_adds_bos(tokenizer), adapter=adapter_file)
        ftcore.write_text_atomic(modelfile_path, text)
        written.append(modelfile_path)
    log("gguf-export: wrote " + ", ".join(str(p) for p in written))
    if parity is not None:
        merged, _ = _peft_merge(adapter_dir, base_path)
        found = check_parity(base_file, merged, tokenizer, parity, settings.quant, lora=adapter_file, log=log)
        if details is not None:
            details.update(found)
    return written


def _adds_bos(tokenizer: Any) -> bool:
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id


def parity_request(settings: GgufExportConfig, result: Any) -> Any:
    """The prompts to check with: given ones, else the run's held-out prompts, else built-in ones."""
    from ftcore_plugins.exporters.gguf import parity

    if not settings.parity:
        return None
    held_out = list(getattr(result, "sample_prompts", None) or [])
    prompts, user, source = ((settings.parity_prompts, True, "given") if settings.parity_prompts
                             else (held_out, False, "run") if held_out else (parity.DEFAULT_PROMPTS, True, "built-in"))
    return parity.Request(prompts, user_messages=user, max_new_tokens=settings.parity_tokens,
                          min_agreement=settings.parity_min_agreement, source=source)


def report_parity(details: dict[str, Any], strict: bool, log: Callable[[str], None]) -> None:
    """A failed (or impossible) parity check: a warning, or with --strict-parity an error."""
    if details.get("passed", True):
        log(f"gguf-export: parity with transformers: token agreement {details['token_agreement']:.1%}, "
            f"identical continuations {details['identical_continuations']}")
        return
    what = details.get("skipped") or "; ".join(details.get("problems") or [])
    message = f"gguf-export: parity check of {Path(details['file']).name} failed: {what}"
    if strict:
        raise ftcore.OutputError(message + " (--strict-parity makes this an error; the file is written)")
    log(f"warning: {message}")


def output_and_name(settings: GgufExportConfig, run_dir: Path, requested: str | os.PathLike | None
                    ) -> tuple[Path, str]:
    """The file to write and the model's name in it.

    The file: ``ftcore export --output`` (``requested``), else ``gguf-export.output``, else
    RUN/gguf/NAME-QUANT.gguf; a folder gets NAME-QUANT.gguf inside. The name:
    ``gguf-export.name``, else the chosen file's stem, else the run folder's name.
    """
    chosen = requested or settings.output
    path = Path(chosen) if chosen is not None else None
    is_file = path is not None and path.suffix.lower() == ".gguf" and not path.is_dir()
    name = settings.name or (path.stem if is_file else run_dir.name)
    if is_file:
        return path, name
    return (path if path is not None else run_dir / "gguf") / f"{name}-{settings.quant}.gguf", name


def _merger(ctx: Any) -> Callable[[Path, Path | None], Any]:
    def merge(adapter_dir: Path, base: Path | None) -> Any:
        merged = ctx.plugins.hook.ftcore_merge_adapter(
            adapter_dir=str(adapter_dir), base_path=str(base) if base else None, dtype="auto", ctx=ctx)
        if merged is None:
            raise PluginError(f"gguf-export: {adapter_dir} is an adapter, and no selected plugin merged it. "
                              f"Add the adapter plugin it was trained with (e.g. lora, qlora) to --plugins.")
        from transformers import AutoTokenizer

        return merged, AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=False)
    return merge


def export_gguf(model_dir: str | os.PathLike, output: str | os.PathLike, *, quant: str = "q8_0",
                name: str | None = None, modelfile: bool = True, overwrite: bool = False,
                base: str | None = None, revision: str | None = None,
                merge: Callable[[Path, Path | None], Any] | None = None,
                log: Callable[[str], None] = print, parity: Any = None,
                details: dict[str, Any] | None = None) -> list[Path]:
    """Export a model folder (or an adapter merged into ``base``) to ``output``; return the paths written.

    ``merge(adapter_dir, base_path)`` returns ``(model, tokenizer)`` for an adapter folder; by
    default PEFT's LoRA merge is used. Everything is checked before a weight is loaded.
    ``parity`` (a ``parity.Request``): check the written file against transformers; what was found
    goes into ``details`` (see ``parity.check``).
    """
    from ftcore_plugins.exporters.gguf import arch as arch_mod
    from ftcore_plugins.exporters.gguf import kquant, writer
    from ftcore_plugins.exporters.gguf import modelfile as mf
    from ftcore_plugins.exporters.gguf import vocab as vocab_mod

    _require_gguf()
    kquant.require(quant)
    model_dir, output = Path(model_dir), Path(output)
    if not model_dir.is_dir():
        raise ConfigError(f"gguf-export: model folder {model_dir} does not exist.")
    is_adapter = (model_dir / "adapter_config.json").is_file()
    base_path = ftcore.resolve_model_path(base, log, revision=revision) if base and is_adapter else None
    if is_adapter and base_path is None:
        base_path = _adapter_base(model_dir, log)
    hparams = arch_mod.read_config(base_path if is_adapter else model_dir)
    arch = arch_mod.check(hparams, str(base_path if is_adapter else model_dir))
    modelfile_path = output.parent / "Modelfile"
    _check_free(output, modelfile_path if modelfile else None, overwrite)

    model = None
    if is_adapter:
        model, tokenizer = (merge or _peft_merge)(model_dir, base_path)
        log(f"gguf-export: merged adapter {model_dir} into {base_path} ({str(model.dtype).removeprefix('torch.')}, "
            f"the base's own dtype)")
        hparams = model.config.to_dict()
        tensors = writer.tensors_of_model(model)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        tensors = writer.tensors_in_folder(model_dir)
        if hparams.get("tie_word_embeddings"):
            tensors = [t for t in tensors if t.name != "lm_head.weight"]
    embed = next((t for t in tensors if t.name.endswith("embed_tokens.weight")), None)
    if embed is None:
        raise ConfigError(f"gguf-export: {model_dir}: no token embedding (embed_tokens.weight) found.")
    vocab = vocab_mod.from_tokenizer(tokenizer, embed.shape[0], str(model_dir))
    arch_mod.check_vocab(arch, vocab.tokens, str(model_dir))
    label = arch_mod.file_name(arch, name or model_dir.name, vocab.rstrip, str(model_dir))
    written = [_write(output, arch, hparams, vocab, tensors, quant, label, log)]
    if modelfile:
        ftcore.write_text_atomic(modelfile_path, mf.modelfile_text(output, tokenizer, drop_bos=vocab.add_bos))
        written.append(modelfile_path)
    log("gguf-export: wrote " + ", ".join(str(p) for p in written))
    if parity is not None:
        found = check_parity(output, model if model is not None else model_dir, tokenizer, parity, quant, log=log)
        if details is not None:
            details.update(found)
    return written


def check_parity(gguf_file: Path, model: Any, tokenizer: Any, request: Any, quant: str, lora: Path | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the parity check of ``gguf_file`` against ``model`` (a model in memory, or a folder to load)."""
    from ftcore_plugins.exporters.gguf import kquant, parity
    from ftcore_plugins.exporters.gguf.llama_cpp_worker import WorkerError

    if not kquant.llama_cpp_installed():
        return {"file": str(gguf_file), "quant": quant, "passed": False,
                "skipped": f"not checked, llama-cpp-python is not installed ({kquant.INSTALL})"}
    if isinstance(model, (str, Path)):   # in the dtype it was saved in: a 7B model at float32 would need 28 GB
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model), dtype="auto", trust_remote_code=False,
                                                     use_safetensors=True)
    prompts = parity.render(request.prompts, tokenizer) if request.user_messages else list(request.prompts)
    try:
        found = parity.check(gguf_file, model, tokenizer, prompts, quant, max_new_tokens=request.max_new_tokens,
                             min_agreement=request.min_agreement, lora=lora, log=log)
        return {**found, "prompts_from": request.source}
    except WorkerError as exc:
        return {"file": str(gguf_file), "quant": quant, "passed": False,
                "problems": [f"llama.cpp could not run the file: {exc}"]}


def _write(output: Path, arch: Any, hparams: dict[str, Any], vocab: Any, tensors: list[Any], quant: str,
           label: str, log: Callable[[str], None]) -> Path:
    """Write ``output``; a k-quant through a 16-bit file that llama.cpp's quantizer reads."""
    from ftcore_plugins.exporters.gguf import kquant, writer

    direct = quant not in kquant.KQUANTS
    kind = quant if direct else kquant.source_type(hparams)
    target = output if direct else kquant.source_path(output, kind)
    planned = writer.plan(tensors, hparams, arch, kind)
    log(f"gguf-export: writing {output} ({arch.gguf_arch}, {quant}, {len(planned)} tensors)")
    try:
        writer.write(target, arch, hparams, vocab, planned, kind, label, log)
        return output if direct else kquant.quantize(target, output, quant, log)
    finally:
        if not direct:
            target.unlink(missing_ok=True)


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PluginError("gguf-export needs the gguf package: pip install 'ftcore[gguf]'.") from None


def _adapter_base(adapter_dir: Path, log: Callable[[str], None]) -> Path:
    import json

    recorded = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = recorded.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"gguf-export: {adapter_dir}/adapter_config.json names no base model; "
                          f"pass the base with --base.")
    return ftcore.resolve_model_path(base, log, revision=recorded.get("revision"))


def _peft_merge(adapter_dir: Path, base: Path | None) -> Any:
    from transformers import AutoTokenizer

    model = ftcore.merge_peft_adapter(str(adapter_dir), str(base) if base else None, "auto")
    return model, AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=False)


def _check_free(output: Path, modelfile: Path | None, overwrite: bool) -> None:
    from ftcore_plugins.exporters.gguf.modelfile import is_ours

    if output.exists() and not overwrite:
        raise ConfigError(f"gguf-export: {output} already exists. Pass --overwrite to replace it, "
                          f"or choose another output file.")
    if modelfile is not None and modelfile.exists() and not is_ours(modelfile):
        raise ConfigError(f"gguf-export: {modelfile} exists and was not written by ftcore; it is left alone. "
                          f"Write the GGUF file to another folder, or set gguf-export.modelfile: false.")
