"""ftcore against the reference recipe and TRL's best configuration, side by side.

    python benchmarks/run.py                 # CPU: ~36M Llama, long-tailed alpaca data (~10 min on 2 cores)
    python benchmarks/run.py --quick         # a smoke run of the same path (~2 min)
    python benchmarks/run.py --gpu           # CUDA, bf16, 1B Llama shape, sequence length 2048, adds MFU
    python benchmarks/run.py --qlora         # adds the QLoRA-vs-LoRA peak memory comparison

One after the other, each in its own process (so each peak memory is its own), with the
same model, data, LoRA settings (r=16, alpha=32, dropout 0.05, q/k/v/o), learning rate,
schedule and number of examples, it trains:

1. ``reference``: the reference recipe (docs: /shared/REFERENCE-RECIPE.md) - TRL's
   SFTTrainer fed the rendered alpaca text (``dataset_text_field="text"``), batch 4 x
   accumulation 4, no packing, paged AdamW 8-bit; adapted only where today's versions
   require it (``SFTConfig`` fields, bf16 off on a CPU, ``warmup_steps`` as a ratio).
2. ``trl_best``: TRL with its best settings for this job - prompt/completion records,
   completion-only loss, padding-free best-fit-decreasing packing (``packing_strategy=
   "bfd"``) into rows of ``max_length`` tokens, 1 row x accumulation 3 (about as many
   examples per optimizer step as 4 x 4), flash-attn when installed.
3. ``ftcore``: ``ftcore.run`` with its defaults (alpaca + lora plugins, packing, its
   speedups), only the shared settings set.

Every trainer is measured the same way: its data collator is wrapped to count computed
positions, real (non-padding) tokens and supervised targets; train time is the
Trainer's ``train_runtime``; the held-out loss is computed by this script, identically
for all three, as the mean cross-entropy over the response tokens (with EOS) of the
fixed held-out set, on the same token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_data  # noqa: E402  (benchmarks/ is not a package)

TRAINERS = ("reference", "trl_best", "ftcore")
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
            bias="none", task_type="CAUSAL_LM")
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
                   ("A10", 125e12), ("L4", 121e12))


# -- settings --------------------------------------------------------------------------

def settings(args: argparse.Namespace) -> dict[str, Any]:
    gpu = args.gpu
    s = {
        "model_size": args.model_size or ("1b" if gpu else ("tiny" if args.quick else "small")),
        "examples": args.examples or (2000 if gpu else (96 if args.quick else 480)),
        "max_length": args.max_length or (2048 if gpu else 512),
        "max_words": 800 if gpu else 200,
        "epochs": 1, "learning_rate": 2e-4, "warmup_ratio": 0.03, "seed": 0,
        "device": "cuda" if gpu else "cpu", "bf16": bool(gpu),
        "heldout": 60 if args.quick else 200,
        "prep_records": args.prep_records if args.prep_records is not None else (20_000 if args.quick else 100_000),
    }
    return s


# -- workers (each runs in its own process) ----------------------------------------------

class Counter:
    """Wraps a data collator and counts what the model computes: positions, real tokens, targets."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.computed = self.real = self.supervised = self.batches = 0
        self.example_lengths: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        ids = batch["input_ids"]
        self.batches += 1
        self.computed += int(ids.numel())
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else int(ids.numel())
        labels = batch["labels"]
        self.supervised += int((labels[..., 1:] != -100).sum())
        pos = batch.get("position_ids")
        if mask is not None:
            self.example_lengths += [int(n) for n in mask.sum(dim=-1)]
        elif pos is not None:
            starts = (pos[0] == 0).nonzero().flatten().tolist() + [pos.shape[-1]]
            self.example_lengths += [b - a for a, b in zip(starts, starts[1:])]
        return batch


def heldout_loss(model: Any, tokenizer: Any, heldout: Path, device: str, max_length: int) -> float:
    """Mean cross-entropy over the response tokens (+EOS) of the held-out records; the same for every trainer."""
    import torch
    import torch.nn.functional as F

    from ftcore.data.labels import tokenize
    from ftcore.types import Example

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation not in ("sdpa", "eager"):
        base.set_attn_implementation("sdpa")
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in heldout.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            ex = Example.from_segments([(PROMPT.format(**r), False), (r["output"] + tokenizer.eos_token, True)],
                                       add_special_tokens=True)
            ids, labels = tokenize(ex, tokenizer)
            ids, labels = ids[:max_length], labels[:max_length]
            x = torch.tensor([ids], device=device)
            y = torch.tensor(labels[1:], device=device)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, y, ignore_index=-100, reduction="sum"))
            count += int((y != -100).sum())
    return total / count


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return round(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def proc_status_mb() -> dict[str, float]:
    """VmHWM (this process's own peak RSS), VmRSS, RssAnon and RssFile from /proc/self/status, in MiB."""
    from ftcore.reporting.memory import proc_status

    found = proc_status()
    return {key: round(found[key] / 2**20, 1) for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


class AnonSampler:
    """Samples the whole worker process's anonymous RSS (from its start): an extra, explanatory measure.

    Anonymous memory is what the process itself allocated (tensors, Python, the allocator's free
    lists); it leaves out file-backed pages: shared libraries and mapped checkpoint files, which the
    kernel can drop and read again. The headline stays the whole-process peak RSS.
    """

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, proc_status_mb()["RssAnon"])
            time.sleep(0.01)


ANON = None   # the worker's AnonSampler


class RssSampler:
    """Samples this process's RSS while training runs (a TrainerCallback): the peak without model loading."""

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        self.before_train: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_mb())
            self._stop.wait(0.05)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        sampler = self

        class Sample(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                sampler.before_train = proc_status_mb()   # VmHWM here: the peak of loading the model
                sampler._thread.start()

            def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
                sampler._stop.set()
                sampler.peak = max(sampler.peak, current_rss_mb())

        return Sample()


def peak_memory_mb(device: str) -> dict[str, float]:
    # VmHWM, not getrusage()'s ru_maxrss: Linux carries ru_maxrss over exec(), so a worker started by
    # the driver reported the driver's own peak whenever that was higher (the driver builds the models).
    out = {"peak_rss_mb": proc_status_mb()["VmHWM"]}
    if ANON is not None:
        out["peak_anon_mb"] = round(max(ANON.peak, proc_status_mb()["RssAnon"]), 1)
    if device == "cuda":
        import torch

        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def flops_per_token(model: Any, mean_context: float) -> dict[str, float]:
    """Model FLOPs per real token for LoRA training (see RESULTS.md for the formula)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    frozen = trainable = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue   # a lookup, not a matmul
        if p.requires_grad:
            trainable += p.numel()
        elif p.dim() == 2 or hasattr(p, "quant_state"):
            frozen += p.numel() * (2 if hasattr(p, "quant_state") else 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * mean_context
    return {"frozen_matmul_params": frozen, "trainable_params": trainable,
            "flops_per_token": 4 * frozen + 6 * trainable + attention}


def finish(name: str, spec: dict[str, Any], trainer: Any, counter: Counter, sampler: RssSampler,
           tokenizer: Any, started: float) -> dict[str, Any]:
    history = trainer.state.log_history
    train_s = next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None)
    losses = [h["loss"] for h in history if "loss" in h]
    result = {
        "trainer": name, "steps": trainer.state.global_step, "train_s": round(train_s, 2),
        "examples_seen": len(counter.example_lengths), "real_tokens": counter.real,
        "supervised_tokens": counter.supervised, "computed_positions": counter.computed,
        "padding_share": round(1 - counter.real / counter.computed, 4) if counter.computed else None,
        "real_tokens_per_s": round(counter.real / train_s, 1),
        "supervised_tokens_per_s": round(counter.supervised / train_s, 1),
        "last_train_loss": losses[-1] if losses else None,
    }
    lengths = counter.example_lengths
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / max(1, sum(lengths))
    t0 = time.time()
    result["eval_loss"] = round(heldout_loss(trainer.model, tokenizer, Path(spec["heldout"]), spec["device"],
                                             spec["max_length"]), 5)
    result["eval_s"] = round(time.time() - t0, 2)
    if spec["device"] == "cuda":
        import torch

        fl = flops_per_token(trainer.model, mean_context)
        name_ = torch.cuda.get_device_name()
        peak = spec.get("peak_flops") or next((f for k, f in PEAK_BF16_FLOPS if k in name_), None)
        result.update(fl, device_name=name_, peak_flops=peak,
                      mfu=round(fl["flops_per_token"] * counter.real / train_s / peak, 4) if peak else None)
    result.update(peak_memory_mb(spec["device"]))
    result["train_peak_rss_mb"] = round(sampler.peak, 1)
    if sampler.before_train:
        result["load_peak_rss_mb"] = sampler.before_train["VmHWM"]
        result["rss_at_train_begin"] = sampler.before_train
    result["wall_s"] = round(time.time() - started, 2)
    result["load_avg_end"] = round(os.getloadavg()[0], 2)
    return result


def model_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    kw: dict[str, Any] = {"dtype": torch.bfloat16 if spec["bf16"] else torch.float32}
    if spec["device"] == "cuda":
        kw["device_map"] = {"": 0}
    return kw


def best_attention(spec: dict[str, Any]) -> str:
    import importlib.util

    if spec["device"] == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def worker_trl(name: str, spec: dict[str, Any], started: float) -> dict[str, Any]:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    ds = load_dataset("json", data_files=spec["train"], split="train")
    common = dict(output_dir=spec["out"], num_train_epochs=spec["epochs"], learning_rate=spec["learning_rate"],
                  warmup_steps=spec["warmup_ratio"], lr_scheduler_type="cosine", logging_steps=10,
                  save_strategy="epoch", bf16=spec["bf16"], max_length=spec["max_length"], report_to="none",
                  seed=spec["seed"], disable_tqdm=True)
    if name == "reference":
        # The recipe: render the whole prompt + response as one text and train on all of it, padded batches.
        ds = ds.map(lambda r: {"text": PROMPT.format(**r) + r["output"]}, remove_columns=ds.column_names)
        args = SFTConfig(per_device_train_batch_size=4, gradient_accumulation_steps=4, optim="paged_adamw_8bit",
                         dataset_text_field="text", packing=False, **common)
        attention = "sdpa"
    else:
        ds = ds.map(lambda r: {"prompt": PROMPT.format(**r), "completion": r["output"]},
                    remove_columns=ds.column_names)
        args = SFTConfig(per_device_train_batch_size=1, gradient_accumulation_steps=3, packing=True,
                         packing_strategy="bfd", padding_free=True, completion_only_loss=True, **common)
        attention = best_attention(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], attn_implementation=attention, **model_kwargs(spec))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         peft_config=LoraConfig(**LORA))
    counter = Counter(trainer.data_collator)
    trainer.data_collator = counter
    sampler = RssSampler()
    trainer.add_callback(sampler.callback())
    trainer.train()
    return finish(name, spec, trainer, counter, sampler, tokenizer, started)


def make_probe() -> tuple[dict[str, Any], Any]:
    """A plugin object that wraps the trainer's collator in a Counter and keeps the trainer."""
    import ftcore

    seen: dict[str, Any] = {"sampler": RssSampler()}

    class BenchmarkProbe:
        @ftcore.hookimpl
        def ftcore_trainer_callbacks(self, ctx):  # noqa: ANN001
            return [seen["sampler"].callback()]

        @ftcore.hookimpl
        def ftcore_data_prepared(self, train_dataset, eval_dataset, stats, ctx):  # noqa: ANN001
            seen["rss_before_model_mb"] = current_rss_mb()

        @ftcore.hookimpl
        def ftcore_trainer_created(self, trainer, ctx):  # noqa: ANN001
            seen["trainer"] = trainer
            seen["counter"] = trainer.data_collator = Counter(trainer.data_collator)

    return seen, BenchmarkProbe()


def make_bnb_qlora() -> Any:
    """QLoRA through bitsandbytes directly, as a plugin object (used when no `qlora` plugin is installed)."""
    import ftcore

    class BnbQLoRA:
        @ftcore.hookimpl
        def ftcore_load_model(self, model_path, tokenizer, config, ctx):  # noqa: ANN001
            import torch
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
            device = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
            model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant, device_map=device,
                                                         dtype=torch.bfloat16)
            model.config.use_cache = False
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            return get_peft_model(model, LoraConfig(**LORA))

    return BnbQLoRA()


def worker_ftcore(name: str, spec: dict[str, Any], started: float) -> dict[str, Any]:
    import ftcore

    probe, plugin = make_probe()
    plugins: list[Any] = [plugin]
    names: list[str] = []
    if name == "ftcore_qlora":
        from ftcore.registry.discovery import installed_entry_points

        if "qlora" in installed_entry_points():
            names = ["qlora"]
        else:
            plugins.append(make_bnb_qlora())
    config = {
        "plugins": names,
        "model": spec["model"],
        "data": {"datasets": [spec["train"]], "max_length": spec["max_length"], "val_size": 0},
        "training": {"epochs": spec["epochs"], "learning_rate": spec["learning_rate"],
                     "warmup_ratio": spec["warmup_ratio"], "seed": spec["seed"]},
        "output_dir": spec["out"], "overwrite": True,
    }
    if name in ("ftcore_lora", "ftcore_qlora"):
        # LoRA vs QLoRA: bf16 weights for both, as the recipe's QLoRA computes (on a CPU without mixed precision:
        # transformers refuses bf16 autocast there unless told use_cpu).
        config["model"] = {"path": spec["model"], "dtype": "bfloat16"}
        config["training"]["precision"] = "bf16" if spec["device"] == "cuda" else "fp32"
    result = ftcore.run(config, plugins=plugins, log=lambda m: None)
    trainer = probe["trainer"]
    out = finish(name, spec, trainer, probe["counter"], probe["sampler"], trainer.processing_class, started)
    out["ftcore_adapter"] = "qlora plugin" if names else ("bitsandbytes directly" if name == "ftcore_qlora" else "lora")
    out["ftcore_runtime_s"] = result.metrics.get("runtime_s")
    out["rss_before_model_mb"] = probe.get("rss_before_model_mb")
    return out


def worker_prep(spec: dict[str, Any]) -> dict[str, Any]:
    """Records per second for validate + render + tokenize of the prep file, cold and from the cache."""
    from transformers import AutoTokenizer

    import ftcore
    from ftcore import data as data_mod

    os.environ["FTCORE_CACHE"] = tempfile.mkdtemp(prefix="ftcore-bench-cache-")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    raw = {"model": spec["model"], "output_dir": spec["out"],
           "data": {"datasets": [spec["prep"]], "max_length": spec["max_length"], "val_size": 0.01}}
    config, plugins = ftcore.resolve(raw, log=lambda m: None)
    out: dict[str, Any] = {"records": None}
    for label in ("cold", "cached"):
        t0 = time.time()
        prepared = data_mod.prepare(config, plugins, tokenizer, log=lambda m: None)
        seconds = time.time() - t0
        assert prepared.stats.cached == (label == "cached")
        out["records"] = prepared.stats.records
        out[f"{label}_s"] = round(seconds, 3)
        out[f"{label}_records_per_s"] = round(prepared.stats.records / seconds, 1)
    if spec.get("prep_per_record"):
        config.data.cache = False
        data_mod.TOKENIZE_BATCH = 1
        t0 = time.time()
        data_mod.prepare(config, plugins, tokenizer, log=lambda m: None)
        seconds = time.time() - t0
        out["per_record_tokenize_s"] = round(seconds, 3)
        out["per_record_tokenize_records_per_s"] = round(out["records"] / seconds, 1)
    out["cache_speedup"] = round(out["cold_s"] / out["cached_s"], 1)
    out["tokens"] = prepared.stats.tokens
    return out


def worker_main(name: str, spec_path: str, result_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    spec = json.loads(Path(spec_path).read_text())
    started = time.time()
    global ANON
    ANON = AnonSampler()
    from transformers import set_seed

    set_seed(spec["seed"])
    if name in ("reference", "trl_best"):
        result = worker_trl(name, spec, started)
    elif name == "prep":
        result = worker_prep(spec)
    else:
        result = worker_ftcore(name, spec, started)
    Path(result_path).write_text(json.dumps(result, indent=2))


# -- the driver ------------------------------------------------------------------------

def run_worker(name: str, spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    spec_path, result_path = work / f"spec-{name}.json", work / f"result-{name}.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    t0 = time.time()
    load = os.getloadavg()[0]
    print(f"[bench] {name} ...", flush=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--worker", name, str(spec_path), str(result_path)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    (work / f"log-{name}.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"[bench] {name} FAILED (exit {proc.returncode}):\n{tail}", flush=True)
        return {"trainer": name, "error": tail}
    result = json.loads(result_path.read_text())
    result["process_s"] = round(time.time() - t0, 2)
    result["load_avg_start"] = round(load, 2)
    print(f"[bench] {name}: " + ", ".join(f"{k}={result[k]}" for k in
          ("train_s", "real_tokens_per_s", "padding_share", "eval_loss", "peak_rss_mb") if k in result), flush=True)
    return result


def ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def compare(results: dict[str, dict[str, Any]], mem_key: str) -> dict[str, Any]:
    ft, ref, best = results.get("ftcore", {}), results.get("reference", {}), results.get("trl_best", {})
    out = {}
    for other_name, other in (("reference", ref), ("trl_best", best)):
        out[f"ftcore_vs_{other_name}"] = {
            "real_tokens_per_s": ratio(ft.get("real_tokens_per_s"), other.get("real_tokens_per_s")),
            "supervised_tokens_per_s": ratio(ft.get("supervised_tokens_per_s"), other.get("supervised_tokens_per_s")),
            "train_time": ratio(ft.get("train_s"), other.get("train_s")),
            "wall_time": ratio(ft.get("wall_s"), other.get("wall_s")),
            "peak_memory": ratio(ft.get(mem_key), other.get(mem_key)),
            "eval_loss": ratio(ft.get("eval_loss"), other.get("eval_loss")),
        }
    r, b = out["ftcore_vs_reference"], out["ftcore_vs_trl_best"]
    out["targets"] = {
        "speed_vs_reference_>=2.0x": bool(r["real_tokens_per_s"] and r["real_tokens_per_s"] >= 2.0),
        "eval_loss_vs_reference_<=+2%": bool(r["eval_loss"] and r["eval_loss"] <= 1.02),
        "speed_vs_trl_best_>=1.0x": bool(b["real_tokens_per_s"] and b["real_tokens_per_s"] >= 1.0),
        "peak_memory_vs_trl_best_<=1.0x": bool(b["peak_memory"] and b["peak_memory"] <= 1.0),
    }
    return out


def markdown(report: dict[str, Any]) -> str:
    s, res, mem_key = report["settings"], report["results"], report["memory_metric"]
    mem_name = "peak CUDA MiB" if mem_key == "peak_cuda_mb" else "peak RSS MiB"
    if not res:   # e.g. --only qlora
        return "\n".join(["# Benchmark results", "", f"Produced by `{report['command']}` on {report['machine']} "
                          f"at {report['finished']}.", *markdown_extras(report), ""])
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{report['command']}` on {report['machine']} at {report['finished']} "
        f"(ftcore {report['versions']['ftcore']}, transformers {report['versions']['transformers']}, "
        f"TRL {report['versions']['trl']}, PEFT {report['versions']['peft']}, torch {report['versions']['torch']}).",
        "",
        f"Model: Llama architecture, {report['model']['params'] / 1e6:.1f}M parameters "
        f"(`{s['model_size']}`: hidden {report['model']['hidden']}, {report['model']['layers']} layers, "
        f"vocabulary {report['model']['vocab']}), random weights, built by `benchmarks/make_data.py`. "
        f"Data: {s['examples']} long-tailed alpaca records (median {report['data']['median_tokens']} tokens, "
        f"p90 {report['data']['p90_tokens']}, max {report['data']['max_tokens']}; "
        f"{report['data']['prompt_share']:.0%} of tokens are prompt), {s['epochs']} epoch, max length "
        f"{s['max_length']}, LoRA r=16 alpha=32 dropout 0.05 on q/k/v/o, lr {s['learning_rate']:g} cosine with "
        f"3% warmup, {'bf16' if s['bf16'] else 'fp32'} on {s['device']}. Held-out loss: mean cross-entropy over "
        f"the response tokens of {s['heldout']} fixed held-out records, computed by the script the same way for all.",
        "",
        f"| trainer | wall s | train s | real tok/s | supervised tok/s | padding share | {mem_name} | "
        f"held-out loss |" + (" MFU |" if mem_key == "peak_cuda_mb" else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if mem_key == "peak_cuda_mb" else ""),
    ]
    for name in TRAINERS:
        r = res.get(name, {})
        if "error" in r or not r:
            lines.append(f"| {name} | failed | | | | | | |")
            continue
        row = (f"| {name} | {r['wall_s']:.0f} | {r['train_s']:.0f} | {r['real_tokens_per_s']:.0f} | "
               f"{r['supervised_tokens_per_s']:.0f} | {r['padding_share']:.1%} | {r[mem_key]:.0f} | "
               f"{r['eval_loss']:.4f} |")
        if mem_key == "peak_cuda_mb":
            row += f" {r['mfu']:.1%} |" if r.get("mfu") is not None else " n/a |"
        lines.append(row)
    c = report["comparison"]
    lines += ["", "| ftcore against | real tok/s | supervised tok/s | train time | peak memory | held-out loss |",
              "|---|---:|---:|---:|---:|---:|"]
    for other in ("reference", "trl_best"):
        r = c[f"ftcore_vs_{other}"]
        fmt = lambda v: f"{v:.2f}x" if v is not None else "n/a"  # noqa: E731
        lines.append(f"| {other} | {fmt(r['real_tokens_per_s'])} | {fmt(r['supervised_tokens_per_s'])} | "
                     f"{fmt(r['train_time'])} | {fmt(r['peak_memory'])} | {fmt(r['eval_loss'])} |")
    lines += ["", "Targets: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in c["targets"].items()) + "."]
    lines += markdown_extras(report)
    lines += ["", "Columns: *real tok/s* = non-padding positions the model computed per second of "
              "`train_runtime`; *supervised tok/s* = positions with a loss target per second (the reference recipe "
              "supervises the prompt too, so its count includes prompt tokens); *padding share* = padding positions / "
              "all computed positions. MFU (GPU only) = (4 x frozen matmul parameters + 6 x trainable parameters + "
              "12 x layers x heads x head_dim x mean causal context) x real tokens / train time / peak bf16 FLOP/s; "
              "embeddings are a lookup and not counted, and the LM head counts at every real token for every trainer.",
              ""]
    return "\n".join(lines)


QLORA_CPU_NOTE = [
    "Why 0.5x is out of reach on this CPU, and where the memory goes (each cause measured on its own with "
    "/proc/self/status at each stage, 290M model, bf16 checkpoint of 554 MiB, 2026-11-29):",
    "- Both processes hold about 600 MiB before the model is loaded (Python, torch, transformers, the data). At "
    "0.5x of LoRA's peak, QLoRA would have about 250 MiB left for its model and training.",
    "- QLoRA's model is 265 MiB: the 4-bit layers with their quantization constants (~137 MiB) and the "
    "embeddings and LM head, which the recipe keeps in fp32 (PEFT's prepare_model_for_kbit_training; 128 MiB). "
    "LoRA's bf16 weights (554 MiB) are pages of the mapped checkpoint.",
    "- Training (one step, gradient checkpointing on for QLoRA) adds about 370 MiB of anonymous memory to QLoRA and "
    "about 390 MiB to LoRA: optimizer and trainer state, torch's per-step buffers, not the weights.",
    "- Fixed in the qlora plugin: transformers' mapped load kept every page of the checkpoint it read resident until the "
    "end of the load (+570 MiB of file pages), and glibc kept about 450 MiB of freed read and upcast buffers. "
    "Before these fixes QLoRA's peak was 1815 MiB, above LoRA's 1585 MiB (1.15x); the load peak fell from 1632 "
    "to 826 MiB in a process at 485 MiB.",
    "- Earlier results of this comparison (2054 vs 2054 MiB) were the driver's peak, not the workers': getrusage's "
    "ru_maxrss survives exec(). Peaks are now each worker's own VmHWM.",
    "- On a GPU the measure is the CUDA allocator's peak, which holds neither the Python process nor file pages: "
    "there the weights, 4-bit and fp32 embeddings against bf16, are about 0.5x LoRA's at this size and less at "
    "larger ones. Not measured: no GPU here.",
]


def markdown_extras(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "prep" in report:
        p = report["prep"]
        if "error" in p:
            lines += ["", "Data preparation: failed."]
        else:
            lines += ["", f"Data preparation ({p['records']:,} alpaca records: validate, render, tokenize, split, "
                      f"cache): {p['cold_records_per_s']:,.0f} records/s cold ({p['cold_s']:.1f} s), "
                      f"{p['cached_records_per_s']:,.0f} records/s from the cache ({p['cached_s']:.2f} s), "
                      f"{p['cache_speedup']}x."
                      + (f" Tokenizing record by record instead of in batches: "
                         f"{p['per_record_tokenize_records_per_s']:,.0f} records/s."
                         if "per_record_tokenize_records_per_s" in p else "")]
    if "qlora" in report:
        q = report["qlora"]
        lines += ["", f"QLoRA vs LoRA ({q.get('model_params', 0) / 1e6:.0f}M-parameter model, "
                  f"{q.get('adapter', '?')}): " + (
                      f"peak {q['lora_peak_mb']:.0f} MiB (LoRA) vs {q['qlora_peak_mb']:.0f} MiB (QLoRA) = "
                      f"{q['ratio']:.2f}x; target <= 0.5x: {'met' if q['ratio'] <= 0.5 else 'MISSED'}."
                      + (f" While training (model loaded): {q['lora_train_peak_mb']:.0f} MiB vs "
                         f"{q['qlora_train_peak_mb']:.0f} MiB = {q['ratio_train']:.2f}x." if "ratio_train" in q else "")
                      + (f" Loading the model (peak RSS before training starts): {q['lora_load_peak_mb']:.0f} MiB vs "
                         f"{q['qlora_load_peak_mb']:.0f} MiB." if "qlora_load_peak_mb" in q else "")
                      + (f" Above the process's RSS before the model is loaded (Python, torch, transformers, data): "
                         f"{q['lora_model_training_mb']:.0f} MiB vs {q['qlora_model_training_mb']:.0f} MiB = "
                         f"{q['ratio_model_training']:.2f}x." if "ratio_model_training" in q else "")
                      + (f" Explanatory only, not the target's measure: peak anonymous RSS (leaves out file-backed "
                         f"pages: the mapped checkpoint, shared libraries) {q['lora_anon_peak_mb']:.0f} MiB vs "
                         f"{q['qlora_anon_peak_mb']:.0f} MiB = {q['ratio_anon']:.2f}x." if "ratio_anon" in q else "")
                      if "ratio" in q else "failed.")]
        if "ratio" in q and report["settings"]["device"] == "cpu" and q["ratio"] > 0.5:
            lines += ["", *QLORA_CPU_NOTE]
    if report.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]]
    return lines


def data_summary(model_dir: Path, train: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    lengths, prompt = [], 0
    for line in train.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        p = tok(PROMPT.format(**r))["input_ids"]
        lengths.append(len(tok(PROMPT.format(**r) + r["output"] + tok.eos_token)["input_ids"]))
        prompt += len(p)
    lengths.sort()
    return {"median_tokens": lengths[len(lengths) // 2], "p90_tokens": lengths[int(0.9 * len(lengths))],
            "max_tokens": lengths[-1], "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "prompt_share": round(prompt / sum(lengths), 3)}


def model_summary(model_dir: Path) -> dict[str, Any]:
    cfg = json.loads((model_dir / "config.json").read_text())
    h, L, V, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    params = L * per_layer + 2 * V * h + h
    return {"params": params, "hidden": h, "layers": L, "vocab": V}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("ftcore", "transformers", "trl", "peft", "torch", "bitsandbytes")}


def main() -> None:
    ap = argparse.ArgumentParser(description="ftcore vs the reference recipe vs TRL's best, side by side.")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (~2 min on 2 CPU cores)")
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, the 1B Llama shape, max length 2048, MFU")
    ap.add_argument("--model-size", choices=sorted(make_data.MODEL_SIZES), help="override the model shape")
    ap.add_argument("--examples", type=int, help="training examples (same for all trainers)")
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--prep-records", type=int, help="records for the data-preparation benchmark (0: skip)")
    ap.add_argument("--prep-per-record", action="store_true",
                    help="also time data preparation with record-by-record tokenization (the old path)")
    ap.add_argument("--qlora", action="store_true", help="also compare QLoRA and LoRA peak memory")
    ap.add_argument("--only", help="comma-separated subset of: reference,trl_best,ftcore,prep,qlora")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's peak bf16 TFLOP/s, when not in the table")
    ap.add_argument("--work", default=str(HERE / ".work"), help="data, models and run folders")
    ap.add_argument("--json", help="results JSON (default benchmarks/results.json; --quick: in --work)")
    ap.add_argument("--markdown", help="results table (default benchmarks/RESULTS.md; --quick: in --work)")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(*args.worker)
        return
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device is visible to torch.")
    s = settings(args)
    work = Path(args.work)
    only = set(args.only.split(",")) if args.only else set(TRAINERS) | {"prep"} | ({"qlora"} if args.qlora else set())
    started = time.time()
    paths = make_data.generate(work, seed=s["seed"], max_words=s["max_words"])
    model_dir = make_data.build(work, s["model_size"], seed=s["seed"], max_positions=max(2048, s["max_length"]))
    train = work / f"train-{s['examples']}.jsonl"
    lines = paths["train"].read_text(encoding="utf-8").splitlines()[: s["examples"]]
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    heldout = work / f"heldout-{s['heldout']}.jsonl"
    heldout.write_text("\n".join(paths["heldout"].read_text(encoding="utf-8").splitlines()[: s["heldout"]]) + "\n")
    prep = paths["prep"]
    if 0 < s["prep_records"] < 100_000:
        prep = work / f"prep-{s['prep_records']}.jsonl"
        prep.write_text("\n".join(paths["prep"].read_text(encoding="utf-8").splitlines()[: s["prep_records"]]) + "\n")
    spec = {**s, "model": str(model_dir), "train": str(train), "heldout": str(heldout), "prep": str(prep), "peak_flops": args.peak_tflops * 1e12 if args.peak_tflops else None,
            "prep_per_record": args.prep_per_record}
    timeout = 3600
    results: dict[str, Any] = {}
    for name in TRAINERS:
        if name in only:
            results[name] = run_worker(name, {**spec, "out": str(work / "runs" / name)}, work, timeout)
    mem_key = "peak_cuda_mb" if s["device"] == "cuda" else "peak_rss_mb"
    report: dict[str, Any] = {
        "command": "python benchmarks/run.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU cores"
                   + (", " + __import__("torch").cuda.get_device_name() if s["device"] == "cuda" else ""),
        "finished": None, "settings": s, "versions": versions(), "memory_metric": mem_key,
        "model": model_summary(model_dir), "data": data_summary(model_dir, train), "results": results,
        "notes": [],
    }
    report["comparison"] = compare(results, mem_key)
    if "prep" in only and s["prep_records"] > 0:
        report["prep"] = run_worker("prep", {**spec, "out": str(work / "runs" / "prep")}, work, timeout)
    if "qlora" in only:
        report["qlora"] = qlora_comparison(spec, work, timeout)
    report["total_s"] = round(time.time() - started, 1)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if os.getloadavg()[0] > (os.cpu_count() or 1) * 1.2:
        report["notes"].append(f"the machine was shared (load average {os.getloadavg()[0]:.1f} on "
                               f"{os.cpu_count()} cores at the end): absolute speeds are noisy; each result "
                               f"records the load average around its run.")
    json_path = Path(args.json) if args.json else (work / "results-quick.json" if args.quick else HERE / "results.json")
    md_path = Path(args.markdown) if args.markdown else (work / "RESULTS-quick.md" if args.quick
                                                         else HERE / "RESULTS.md")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    print(md_path.read_text())
    print(f"[bench] wrote {json_path} and {md_path} in {report['total_s']:.0f} s")


def qlora_comparison(spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """Peak memory of ftcore LoRA vs QLoRA on a model whose weights dominate memory (a few short steps)."""
    size = "medium" if spec["device"] == "cpu" else "1b"
    model_dir = make_data.build(work, size, seed=spec["seed"], max_positions=2048)
    train = work / "train-qlora.jsonl"
    lines = Path(spec["train"]).read_text(encoding="utf-8").splitlines()[:4]
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    q = {**spec, "model": str(model_dir), "train": str(train), "max_length": 128, "heldout": str(work / "heldout-qlora.jsonl")}
    Path(q["heldout"]).write_text("\n".join(Path(spec["heldout"]).read_text().splitlines()[:2]) + "\n")
    mem_key = "peak_cuda_mb" if spec["device"] == "cuda" else "peak_rss_mb"
    out: dict[str, Any] = {"model_size": size, "model_params": model_summary(model_dir)["params"]}
    for name in ("ftcore_lora", "ftcore_qlora"):
        out[name] = run_worker(name, {**q, "out": str(work / "runs" / name)}, work, timeout)
    lora, qlora = out["ftcore_lora"], out["ftcore_qlora"]
    if mem_key in lora and mem_key in qlora:
        out.update(lora_peak_mb=lora[mem_key], qlora_peak_mb=qlora[mem_key], adapter=qlora.get("ftcore_adapter"),
                   ratio=round(qlora[mem_key] / lora[mem_key], 3))
        if mem_key == "peak_rss_mb":
            out.update(lora_train_peak_mb=lora["train_peak_rss_mb"], qlora_train_peak_mb=qlora["train_peak_rss_mb"],
                       ratio_train=round(qlora["train_peak_rss_mb"] / lora["train_peak_rss_mb"], 3))
            if lora.get("load_peak_rss_mb") and qlora.get("load_peak_rss_mb"):
                out.update(lora_load_peak_mb=lora["load_peak_rss_mb"], qlora_load_peak_mb=qlora["load_peak_rss_mb"])
            if lora.get("peak_anon_mb") and qlora.get("peak_anon_mb"):
                # Explanatory only: leaves out file-backed pages (the mapped checkpoint, shared libraries).
                out.update(lora_anon_peak_mb=lora["peak_anon_mb"], qlora_anon_peak_mb=qlora["peak_anon_mb"],
                           ratio_anon=round(qlora["peak_anon_mb"] / lora["peak_anon_mb"], 3))
        if mem_key == "peak_rss_mb" and lora.get("rss_before_model_mb") and qlora.get("rss_before_model_mb"):
            # What the model and training add on top of the process (Python, torch, transformers, the data).
            lora_own = lora[mem_key] - lora["rss_before_model_mb"]
            qlora_own = qlora[mem_key] - qlora["rss_before_model_mb"]
            out.update(lora_model_training_mb=round(lora_own, 1), qlora_model_training_mb=round(qlora_own, 1),
                       ratio_model_training=round(qlora_own / lora_own, 3))
    return out


if __name__ == "__main__":
    main()
