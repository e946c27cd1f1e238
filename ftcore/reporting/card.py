"""The model card: README.md in the saved adapter or model folder, what a reader of a published model wants.

Its metadata header is the Hub's (huggingface_hub's ``ModelCardData``): ``base_model`` (a Hub base), the
library (``peft`` for an adapter, else ``transformers``), the base model's licence, the training datasets that
are Hub ids, tags (``ftcore``, the method, ``gguf`` when a GGUF file goes with it) and the final eval loss as a
result (``model-index``). The body says what was trained, on what data (counts, lengths, packing), with which
settings and for how long, shows the loss curve (``training_loss.png`` beside it, so that it renders on the Hub),
and how to load it: with PEFT or transformers, and with llama.cpp or Ollama when a GGUF file was exported.

An adapter whose base came from the Hub also records the base's id and commit in its adapter_config.json
(``base_model_name_or_path``, ``revision``) instead of the local cache folder, so that it loads its base by id
anywhere (``AutoPeftModelForCausalLM``) and publishes no local path.

Local data files and folders are named by their file name only: a card never shows a local path.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from ftcore import runfolder
from ftcore.data.audit import audit_brief
from ftcore.files import write_json_atomic, write_text_atomic
from ftcore.models.hub import endpoint, parse_hub_id
from ftcore.reporting.report import loss_plot
from ftcore.reporting.summary import fmt_duration
from ftcore.types import RunContext
from ftcore.version import __version__

CARD = "README.md"
CURVE = "training_loss.png"
VERSIONS = ("transformers", "peft", "torch", "datasets", "huggingface_hub")


def write_model_card(ctx: RunContext, folder: Path | None = None, repo_id: str | None = None,
                     gguf_files: list[Path] | None = None) -> Path:
    """Write README.md and training_loss.png into ``folder`` (default: the run's adapter/ or model/); return it.

    ``repo_id``: where the model is published, used in the loading examples (default: the folder's path
    relative to the run). ``gguf_files``: GGUF files that go with it (default: those the run exported).
    """
    result = ctx.result
    folder = Path(folder or result.model_dir)
    gguf = [Path(p) for p in (gguf_files if gguf_files is not None else result.exports) if str(p).endswith(".gguf")]
    facts = _Facts(ctx, folder, repo_id, gguf)
    rows = runfolder.read_metrics(ctx.output_dir)
    if any("loss" in r or "eval_loss" in r for r in rows):
        _write_bytes(folder / CURVE, loss_plot(rows))
    _pin_adapter_base(folder, facts.base_id, facts.base_commit)
    return write_text_atomic(folder / CARD, render(facts, has_curve=(folder / CURVE).is_file()))


def ensure_model_card(ctx: RunContext) -> Path | None:
    """The card of the run's saved adapter or model, written unless ftcore's card is there already (hub-push
    writes it before uploading). Another README.md (PEFT saves its template with an adapter) is replaced."""
    folder = ctx.result.model_dir if ctx.result is not None else None
    if folder is None or not Path(folder).is_dir():
        return None
    card = Path(folder) / CARD
    return card if is_ftcore_card(card) else write_model_card(ctx, Path(folder))


def is_ftcore_card(path: Path) -> bool:
    """Whether ``path`` is a model card ftcore wrote (its metadata is tagged ``ftcore``)."""
    from huggingface_hub import metadata_load

    try:
        meta = metadata_load(path) if Path(path).is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return bool(meta) and "ftcore" in (meta.get("tags") or [])


class _Facts:
    """Everything the card says, read once from the run's config, result and folder."""

    def __init__(self, ctx: RunContext, folder: Path, repo_id: str | None, gguf: list[Path]) -> None:
        config, result = ctx.config, ctx.result
        self.config, self.result, self.folder, self.gguf = config, result, folder, gguf
        self.metrics, self.stats = result.metrics or {}, result.data_stats or {}
        self.adapter_config = _read_json(folder / "adapter_config.json")
        self.is_adapter = self.adapter_config is not None
        self.published = repo_id is not None
        self.where = repo_id or f"{ctx.output_dir.name}/{folder.name}"
        self.name = repo_id or ctx.output_dir.name
        base = parse_hub_id(config.model.path, config.model.revision)
        self.base_id = base.repo_id if base else None
        self.base_commit = config.model.revision if base else None
        self.base_label = self.base_id or Path(config.model.path).name
        kinds = {p.get("name"): p.get("kind") for p in result.plugins or [] if isinstance(p, dict)}
        self.method = next((n for n, k in kinds.items() if k == "adapter"), "full")
        self.formats = [n for n, k in kinds.items() if k == "format"]
        self.objective = next((n for n, k in kinds.items() if k == "objective"), "sft")
        self.datasets = [spec for spec in [*config.data.datasets, *config.data.eval_datasets]]
        self.hub_datasets = list(dict.fromkeys(s.path for s in self.datasets if parse_hub_id(s.path)))
        marker = _read_json(ctx.output_dir / runfolder.MARKER) or {}
        self.precision = marker.get("precision") or ctx.precision
        self.licence = result.base_model_license or None

    def card_data(self) -> Any:
        from huggingface_hub import EvalResult, ModelCardData

        tags = ["ftcore", self.method]
        if self.is_adapter:
            tags.append(str(self.adapter_config.get("peft_type", "lora")).lower())
        tags += self.formats + (["gguf"] if self.gguf else [])
        if self.objective != "sft":
            tags.append(self.objective)   # dpo, kto: TRL's and the Hub's tags for preference-trained models
        licence = self.licence or {}
        eval_loss = self.metrics.get("eval_loss")
        results = None
        if isinstance(eval_loss, (int, float)):
            results = [EvalResult(task_type="text-generation", dataset_type=(self.hub_datasets or ["held-out"])[0],
                                  dataset_name="held-out split of the training data", dataset_split="validation",
                                  metric_type="loss", metric_name="eval loss", metric_value=round(eval_loss, 4))]
        return ModelCardData(base_model=self.base_id, library_name="peft" if self.is_adapter else "transformers",
                             license=licence.get("license"), license_name=licence.get("license_name"),
                             license_link=licence.get("license_link"), datasets=self.hub_datasets or None,
                             tags=list(dict.fromkeys(tags)), pipeline_tag="text-generation",
                             model_name=self.name, eval_results=results)


def render(facts: _Facts, has_curve: bool) -> str:
    """The README.md text: the metadata header, then the body."""
    parts = ["---", facts.card_data().to_yaml(), "---", "", f"# {facts.name}", "", _summary(facts), "",
             "## Training data", "", _table(_data_rows(facts)), "",
             "## Training settings", "", _table(_settings_rows(facts)), "",
             "## Results", "", _table(_result_rows(facts)), ""]
    if has_curve:
        parts += ["## Loss curve", "", f"![Training and evaluation loss by step]({CURVE})", ""]
    parts += ["## How to use", "", *_usage(facts), "## Framework versions", "", *_versions(), "",
              "## Licence", "", _licence_text(facts), ""]
    return "\n".join(parts)


def _summary(facts: _Facts) -> str:
    what = {"lora": "A LoRA adapter", "qlora": "A QLoRA adapter (trained on a 4-bit base)"}.get(
        facts.method, "A LoRA adapter" if facts.is_adapter else "A fully fine-tuned model")
    if facts.folder.name == runfolder.MERGED:
        what = f"A {facts.method} adapter merged into its base model"
    base = (f"[{facts.base_id}]({endpoint()}/{facts.base_id}) (commit `{facts.base_commit}`)" if facts.base_id
            else f"`{facts.base_label}`")
    formats = f" in the {', '.join(facts.formats)} format" if facts.formats else ""
    records = facts.stats.get("records")
    data = f" on {records} records{formats}" if records is not None else formats
    objective = OBJECTIVES.get(facts.objective, f"the {facts.objective} objective")
    return f"{what} for {base}, trained with ftcore {__version__} ({objective}){data}."


OBJECTIVES = {"sft": "supervised fine-tuning", "dpo": "preference training: DPO with TRL's DPOTrainer",
              "kto": "preference training: KTO with TRL's KTOTrainer"}


def _data_rows(facts: _Facts) -> list[tuple[str, str]]:
    s, d = facts.stats, facts.config.data
    names = [f"`{spec.path}` (Hub)" if parse_hub_id(spec.path) else f"`{Path(spec.path).name}`"
             for spec in facts.datasets]
    rows = [("datasets", ", ".join(names) or "-"), ("format", ", ".join(facts.formats) or "-")]
    if s:
        rows += [("records", f"{s.get('records', '?')} ({s.get('bad_records', 0)} invalid)"),
                 ("examples", f"{s.get('train_examples', '?')} for training, {s.get('eval_examples', 0)} held out"),
                 ("tokens", f"{s.get('tokens', '?')} ({s.get('supervised_tokens', '?')} supervised)")]
    if s.get("audit"):
        rows.append(("data audit", audit_brief(s["audit"])))
    rows.append(("length", f"at most {d.max_length} tokens per example ({s.get('truncated', 0)} truncated, "
                           f"{s.get('dropped_too_long', 0)} dropped)"))
    efficiency = facts.metrics.get("packing_efficiency") or s.get("packing_efficiency")
    packing = "packed, padding-free" if d.packing else "padded batches"
    rows.append(("batching", packing + (f" ({efficiency:.1%} of computed positions are real tokens)"
                                        if isinstance(efficiency, float) else "")))
    return rows


def _settings_rows(facts: _Facts) -> list[tuple[str, str]]:
    t, launch = facts.config.training, facts.config.launch
    rows = [("method", _method_text(facts))]
    rows.append(("epochs", f"{t.epochs:g}" + (f" (at most {t.max_steps} steps)" if t.max_steps > 0 else "")))
    total = t.batch_size * t.gradient_accumulation * launch.num_processes
    rows.append(("batch", f"{t.batch_size} per device x {t.gradient_accumulation} accumulation x "
                          f"{launch.num_processes} process(es) = {total} examples per step"))
    rows.append(("learning rate", f"{t.learning_rate:g}, {t.lr_scheduler} schedule, {t.warmup_ratio:.0%} warmup"))
    rows.append(("precision", str(facts.precision)))
    rows.append(("seed", str(t.seed)))
    return rows


def _method_text(facts: _Facts) -> str:
    cfg = facts.adapter_config
    if not cfg:
        return f"{facts.method} (all weights trained)"
    targets = cfg.get("target_modules") or []
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    return (f"{facts.method}: rank {cfg.get('r')}, alpha {cfg.get('lora_alpha')}, dropout {cfg.get('lora_dropout')}"
            f" on {targets}")


def _result_rows(facts: _Facts) -> list[tuple[str, str]]:
    m = facts.metrics
    rows = []
    if m.get("eval_loss") is not None:
        start = m.get("eval_loss_start")
        rows.append(("final eval loss", f"{m['eval_loss']:.4f}" + (f" (before training: {start:.4f})"
                                                                    if isinstance(start, float) else "")))
    if m.get("train_loss") is not None:
        rows.append(("final train loss", f"{m['train_loss']:.4f}"))
    for key, label in (("eval_rewards/accuracies", "held-out reward accuracy"),
                       ("eval_rewards/margins", "held-out reward margin")):
        if isinstance(m.get(key), (int, float)):
            start = m.get(f"{key}_start")
            rows.append((label, f"{m[key]:.4f}" + (f" (before training: {start:.4f})"
                                                   if isinstance(start, (int, float)) else "")))
    rows.append(("steps", f"{m.get('steps', '?')} ({_epochs(m.get('epochs'))} epochs)"))
    rows.append(("training time", fmt_duration(m.get("runtime_s"))))
    if m.get("tokens"):
        rows.append(("tokens trained on", str(m["tokens"])))
    return rows


def _epochs(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "?"


def _usage(facts: _Facts) -> list[str]:
    where, base = facts.where, facts.base_id or f"path/to/{facts.base_label}"
    revision = f', revision="{facts.base_commit}"' if facts.base_commit else ""
    if facts.is_adapter:
        lines = ["With PEFT:", "", "```python", "from peft import PeftModel",
                 "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 f'base = AutoModelForCausalLM.from_pretrained("{base}"{revision})',
                 f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
        if _tokens_added(facts):
            lines.append("base.resize_token_embeddings(len(tokenizer))   # the tokens the format added in training")
        lines += [f'model = PeftModel.from_pretrained(base, "{where}")', "```", ""]
    else:
        lines = ["With transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                 "", f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "",
                 f"Or try it with ftcore: `ftcore chat --model {where}`.", ""]
    for path in facts.gguf:
        lines += _gguf_usage(facts, path)
    return lines


def _gguf_usage(facts: _Facts, path: Path) -> list[str]:
    quant = path.stem.rsplit("-", 1)[-1].upper() if "-" in path.stem else ""
    lines = [f"With llama.cpp or Ollama (`{path.name}`{f', {quant}' if quant else ''}):", "", "```sh"]
    if facts.published:   # by repository id
        lines += [f'llama-cli --hf-repo {facts.where} --hf-file {path.name} -p "Hello"',
                  f"ollama run hf.co/{facts.where}" + (f":{quant}" if quant else "")]
    else:
        lines += [f'llama-cli -m {path.name} -p "Hello"', "ollama create my-model -f Modelfile   # next to the file"]
    return lines + ["```", ""]


def _tokens_added(facts: _Facts) -> bool:
    """Whether the saved tokenizer is larger than the base's vocabulary (a format added tokens)."""
    cfg = facts.adapter_config or {}
    if not (cfg.get("trainable_token_indices") or cfg.get("modules_to_save")) \
            or not (facts.folder / "tokenizer.json").is_file():
        return False
    from transformers import AutoTokenizer

    try:
        size = len(AutoTokenizer.from_pretrained(str(facts.folder)))
    except (OSError, ValueError):
        return False
    vocab = _base_vocab(facts)
    return vocab is not None and size > vocab


def _base_vocab(facts: _Facts) -> int | None:
    from ftcore.models.paths import resolve_model_path

    try:
        base = resolve_model_path(facts.config.model.path, lambda m: None, revision=facts.config.model.revision,
                                  weights=False)
    except Exception:  # noqa: BLE001 - the card then says nothing about resizing
        return None
    return (_read_json(base / "config.json") or {}).get("vocab_size")


def _versions() -> list[str]:
    rows = [f"- ftcore {__version__}"]
    for name in VERSIONS:
        try:
            rows.append(f"- {name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return rows


def _licence_text(facts: _Facts) -> str:
    licence = facts.licence
    if not licence:
        return (f"The base model ({facts.base_label}) states no licence in its card or config: check its terms "
                f"before you use or share this model.")
    shown = licence.get("license") or licence.get("license_name")
    return (f"The base model's licence applies: {shown} (from the base's {licence.get('source', 'card')}). "
            f"Check its terms before you use or share this model.")


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _pin_adapter_base(folder: Path, base_id: str | None, commit: str | None) -> None:
    """Record a Hub base by id and commit in the adapter's config, instead of the local cache folder."""
    path = folder / "adapter_config.json"
    cfg = _read_json(path)
    if cfg is None or base_id is None:
        return
    if cfg.get("base_model_name_or_path") != base_id or cfg.get("revision") != commit:
        write_json_atomic(path, {**cfg, "base_model_name_or_path": base_id, "revision": commit})


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
