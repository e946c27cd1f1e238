"""ftcore against the reference recipe and TRL's best configuration, side by side, with equal settings.

    python benchmarks/run.py                 # CPU: both cases, 3 interleaved rounds (~1 h on 2 cores; models cached)
    python benchmarks/run.py --quick         # a smoke run of the same path (a tiny model, one round)
    python benchmarks/run.py --gpu           # CUDA, bf16, 1B Llama shape, sequence length 2048, adds MFU
    python benchmarks/run.py --only qlora    # the QLoRA-vs-LoRA peak memory comparison (RESULTS-qlora.md)

Every trainer runs in its own process (so each peak memory is its own) on the same model, data,
LoRA settings (r=16, alpha=32, dropout 0.05, q/k/v/o), learning rate, schedule, number of
examples and epochs, with gradient checkpointing off for all (TRL's SFTConfig turns it on by
default: it is set explicitly) and the trainer's default AdamW for all:

- ``recipe_as_written``: the reference recipe exactly as users copy it (shared/REFERENCE-RECIPE.md):
  TRL's SFTTrainer on the rendered alpaca text, batch 4 x accumulation 4, no packing, and its paged
  8-bit AdamW. Labelled so in the tables: its optimizer differs, so it is not in the speed ratios.
- ``reference``: the same recipe with the AdamW every other trainer uses.
- ``trl_best``: TRL configured for the job. Its candidates (below, ``TRL_CANDIDATES``) are each
  measured once on the first third of the case's training examples (the same third for each), and the
  fastest (least train time for the same examples) is the one run in the rounds on all of them; the tables
  name the winner and list every candidate's time.
- ``ftcore``: ``ftcore.run`` with its defaults (alpaca + lora, packing and its speedups); the report's
  before/after sample generation is off (it would be timed as training).

The learning rate is 1e-3 for every trainer, not the reference recipe's 2e-4: one epoch of 480 examples
at 2e-4 moved the pretrained model's held-out loss by about 0.1 (measured with ftcore: 9.83 to 9.71), too
little for the trainers' losses to say anything; at 1e-3 it fell to 8.78.

Two cases: ``favorable`` (response-only loss, a 16,384-token vocabulary: where logits only at
supervised positions and packing matter) and ``least_favorable`` (the loss on every token and a
2,048-token vocabulary: ftcore's sparse logits save nothing). The model is briefly pretrained on plain
text of the data's made-up language (benchmarks/make_data.py), so held-out losses show learning rather
than a random model's uniform guess; the tables give the base model's held-out loss next to each
trainer's. Each case runs ``--rounds`` rounds (default 3), every trainer once per round in turn
(interleaved, so a slow spell of the shared machine hits them all); the tables show the median and the
range. The commit, whether the tree had changes, and library versions are recorded.

Every trainer is measured the same way: its data collator is wrapped to count computed positions,
real (non-padding) tokens and supervised targets; train time is the Trainer's ``train_runtime``; the
held-out loss is computed by this script, identically for all, as the mean cross-entropy over the
response tokens (with EOS) of the fixed held-out set, on the same token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_data  # noqa: E402  (benchmarks/ is not a package)

TRAINERS = ("recipe_as_written", "reference", "trl_best", "ftcore")
SPEED_TRAINERS = ("reference", "trl_best", "ftcore")   # the same optimizer: their speeds compare
CASES = ("favorable", "least_favorable")
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
            bias="none", task_type="CAUSAL_LM")
# TRL's ways of doing this job, measured to pick its best: (name, SFTConfig settings beyond the common ones).
TRL_CANDIDATES = {
    "bfd_padding_free": dict(per_device_train_batch_size=1, gradient_accumulation_steps=3, packing=True,
                             packing_strategy="bfd", padding_free=True),
    "wrapped_packing": dict(per_device_train_batch_size=1, gradient_accumulation_steps=3, packing=True,
                            packing_strategy="wrapped"),
    "padded_4x4": dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, packing=False),
}
# Peak dense bf16 TFLOP/s by GPU, matched on the device name's own words, most specific first
# (an "L40S" is not an "L40", nor an "L40" an "L4"; an H100 PCIe is not an SXM part).
PEAK_BF16_TFLOPS = (
    (r"\bB200\b", 2250), (r"\bH200\b", 989), (r"\bH100\b.*\bPCIe\b", 756), (r"\bH100\b.*\bNVL\b", 835),
    (r"\bH100\b", 989), (r"\bA100\b", 312), (r"\bL40S\b", 362), (r"\bL40\b", 181), (r"\bL4\b", 121),
    (r"\bA10G\b", 70), (r"\bA10\b", 125), (r"\bRTX 4090\b", 165), (r"\bRTX 3090\b", 71), (r"\bV100\b", 125),
    (r"\bT4\b", 65),
)


def peak_tflops(device_name: str) -> float | None:
    """The GPU's peak dense bf16 (fp16 where it has no bf16) TFLOP/s from its name, or None when unknown."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return float(tflops)
    return None


# -- settings --------------------------------------------------------------------------

def case_settings(args: argparse.Namespace, case: str) -> dict[str, Any]:
    gpu = args.gpu
    s = {
        "case": case,
        "model_size": args.model_size or ("1b" if gpu else ("tiny" if args.quick else "small")),
        "vocab": 16384 if case == "favorable" else 2048,
        "loss_on": "response" if case == "favorable" else "all",
        "pretrain_tokens": 0 if gpu else (20_000 if args.quick else 150_000),
        "examples": args.examples or (2000 if gpu else (64 if args.quick else 480)),
        "max_length": args.max_length or (2048 if gpu else 512),
        "max_words": 800 if gpu else 200,
        "epochs": 1, "learning_rate": 1e-3, "warmup_ratio": 0.03, "seed": 0,
        "device": "cuda" if gpu else "cpu", "bf16": bool(gpu),
        "heldout": 40 if args.quick else 200,
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


def flops_per_token(model: Any, mean_context: float, head_positions_share: float) -> dict[str, float]:
    """Model FLOPs per real token for LoRA training (see RESULTS.md for the formula).

    The output layer counts only at the share of positions where the trainer computes logits
    (ftcore: the supervised ones, with sparse logits), not at every token.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    head = base.get_output_embeddings()
    frozen = trainable = head_params = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue   # a lookup, not a matmul
        if head is not None and any(p is q for q in head.parameters()):
            head_params += p.numel()
            continue
        if p.requires_grad:
            trainable += p.numel()
        elif p.dim() == 2 or hasattr(p, "quant_state"):
            frozen += p.numel() * (2 if hasattr(p, "quant_state") else 1)
    if head is not None and head_params == 0:   # tied to the input embeddings
        head_params = head.weight.numel()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * mean_context
    return {"frozen_matmul_params": frozen, "trainable_params": trainable, "head_params": head_params,
            "head_positions_share": round(head_positions_share, 4),
            "flops_per_token": 4 * frozen + 6 * trainable + 4 * head_params * head_positions_share + attention}


def finish(name: str, spec: dict[str, Any], trainer: Any, counter: Counter, sampler: RssSampler,
           tokenizer: Any, started: float, head_positions: str = "all") -> dict[str, Any]:
    history = trainer.state.log_history
    train_s = next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None)
    losses = [h["loss"] for h in history if "loss" in h]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    result = {
        "trainer": name, "steps": trainer.state.global_step, "train_s": round(train_s, 2),
        "optimizer": type(optimizer).__name__,
        "gradient_checkpointing": bool(getattr(trainer.args, "gradient_checkpointing", False)),
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

        share = counter.supervised / counter.real if head_positions == "supervised" and counter.real else 1.0
        fl = flops_per_token(trainer.model, mean_context, share)
        device_name = torch.cuda.get_device_name()
        peak = (spec.get("peak_tflops") or peak_tflops(device_name) or 0) * 1e12 or None
        result.update(fl, device_name=device_name, peak_flops=peak,
                      mfu=round(fl["flops_per_token"] * counter.real / train_s / peak, 4) if peak else None)
    result.update(peak_memory_mb(spec["device"]))
    result["train_peak_rss_mb"] = round(sampler.peak, 1)
    if sampler.before_train:
        result["load_peak_rss_mb"] = sampler.before_train["VmHWM"]
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
    """The recipe (as written or with AdamW) and TRL's candidates, all through TRL's SFTTrainer."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    ds = load_dataset("json", data_files=spec["train"], split="train")
    common = dict(output_dir=spec["out"], num_train_epochs=spec["epochs"], learning_rate=spec["learning_rate"],
                  warmup_steps=spec["warmup_ratio"], lr_scheduler_type="cosine", logging_steps=10,
                  save_strategy="no", bf16=spec["bf16"], max_length=spec["max_length"], report_to="none",
                  seed=spec["seed"], disable_tqdm=True,
                  gradient_checkpointing=False)   # SFTConfig's default is True; every trainer here runs without
    if name in ("recipe_as_written", "reference"):
        # The recipe: render the whole prompt + response as one text and train on all of it, padded batches.
        ds = ds.map(lambda r: {"text": PROMPT.format(**r) + r["output"]}, remove_columns=ds.column_names)
        extra = {"optim": "paged_adamw_8bit"} if name == "recipe_as_written" else {}
        args = SFTConfig(per_device_train_batch_size=4, gradient_accumulation_steps=4, dataset_text_field="text",
                         packing=False, **extra, **common)
        attention = "sdpa"
    else:
        candidate = spec["trl_candidate"]
        ds = ds.map(lambda r: {"prompt": PROMPT.format(**r), "completion": r["output"]},
                    remove_columns=ds.column_names)
        args = SFTConfig(completion_only_loss=spec["loss_on"] == "response", **TRL_CANDIDATES[candidate], **common)
        attention = best_attention(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], attn_implementation=attention, **model_kwargs(spec))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         peft_config=LoraConfig(**LORA))
    counter = Counter(trainer.data_collator)
    trainer.data_collator = counter
    sampler = RssSampler()
    trainer.add_callback(sampler.callback())
    trainer.train()
    result = finish(name, spec, trainer, counter, sampler, tokenizer, started)
    if name == "trl_best":
        result["trl_candidate"] = spec["trl_candidate"]
    return result


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
        "data": {"datasets": [spec["train"]], "max_length": spec["max_length"], "val_size": 0, "cache": False},
        "training": {"epochs": spec["epochs"], "learning_rate": spec["learning_rate"],
                     "warmup_ratio": spec["warmup_ratio"], "seed": spec["seed"], "gradient_checkpointing": False,
                     "save_strategy": "no"},
        "report": {"samples": 0},   # the before/after generations run inside train(): they would be timed as training
        "alpaca": {"train_on_inputs": spec.get("loss_on") == "all"},
        "output_dir": spec["out"], "overwrite": True,
    }
    if name in ("ftcore_lora", "ftcore_qlora"):
        # LoRA vs QLoRA: bf16 weights for both, as the recipe's QLoRA computes (on a CPU without mixed precision:
        # transformers refuses bf16 autocast there unless told use_cpu).
        config["model"] = {"path": spec["model"], "dtype": "bfloat16"}
        config["training"]["precision"] = "bf16" if spec["device"] == "cuda" else "fp32"
    result = ftcore.run(config, plugins=plugins, log=lambda m: None)
    trainer = probe["trainer"]
    sparse = getattr(type(trainer), "sparse_logits", False)
    out = finish(name, spec, trainer, probe["counter"], probe["sampler"], trainer.processing_class, started,
                 head_positions="supervised" if sparse else "all")
    out["ftcore_adapter"] = "qlora plugin" if names else ("bitsandbytes directly" if name == "ftcore_qlora" else "lora")
    out["ftcore_runtime_s"] = result.metrics.get("runtime_s")
    out["rss_before_model_mb"] = probe.get("rss_before_model_mb")
    return out


def worker_base(spec: dict[str, Any], started: float) -> dict[str, Any]:
    """The base model's held-out loss before any fine-tuning (what each trainer's loss is measured against)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], attn_implementation="sdpa", **model_kwargs(spec))
    return {"trainer": "base", "eval_loss": round(heldout_loss(model, tokenizer, Path(spec["heldout"]),
                                                              spec["device"], spec["max_length"]), 5)}


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
    if name == "base":
        result = worker_base(spec, started)
    elif name in ("recipe_as_written", "reference", "trl_best"):
        result = worker_trl(name, spec, started)
    else:
        result = worker_ftcore(name, spec, started)
    Path(result_path).write_text(json.dumps(result, indent=2))


# -- the driver ------------------------------------------------------------------------

def run_worker(name: str, spec: dict[str, Any], work: Path, timeout: float, tag: str = "") -> dict[str, Any]:
    label = f"{name}{'-' + tag if tag else ''}"
    spec_path, result_path = work / f"spec-{label}.json", work / f"result-{label}.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    t0 = time.time()
    load = os.getloadavg()[0]
    print(f"[bench] {label} ...", flush=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--worker", name, str(spec_path), str(result_path)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    (work / f"log-{label}.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"[bench] {label} FAILED (exit {proc.returncode}):\n{tail}", flush=True)
        return {"trainer": name, "error": tail}
    result = json.loads(result_path.read_text())
    result["process_s"] = round(time.time() - t0, 2)
    result["load_avg_start"] = round(load, 2)
    print(f"[bench] {label}: " + ", ".join(f"{k}={result[k]}" for k in
          ("train_s", "real_tokens_per_s", "padding_share", "eval_loss", "peak_rss_mb") if k in result), flush=True)
    return result


METRICS = ("train_s", "real_tokens_per_s", "supervised_tokens_per_s", "padding_share", "peak_rss_mb",
           "peak_cuda_mb", "eval_loss", "mfu", "wall_s")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of each metric over a trainer's rounds (failed rounds left out, and counted)."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"rounds": len(ok), "failed": len(runs) - len(ok)}
    for key in METRICS:
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    for key in ("optimizer", "gradient_checkpointing", "trl_candidate", "steps", "examples_seen"):
        if ok and key in ok[0]:
            out[key] = ok[0][key]
    return out


def ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def compare(summary: dict[str, dict[str, Any]], mem_key: str) -> dict[str, Any]:
    """ftcore against the trainers with the same optimizer, on the medians."""
    med = lambda t, k: (summary.get(t, {}).get(k) or {}).get("median")  # noqa: E731
    out = {}
    for other in ("reference", "trl_best"):
        out[f"ftcore_vs_{other}"] = {
            "real_tokens_per_s": ratio(med("ftcore", "real_tokens_per_s"), med(other, "real_tokens_per_s")),
            "supervised_tokens_per_s": ratio(med("ftcore", "supervised_tokens_per_s"),
                                             med(other, "supervised_tokens_per_s")),
            "train_time": ratio(med("ftcore", "train_s"), med(other, "train_s")),
            "peak_memory": ratio(med("ftcore", mem_key), med(other, mem_key)),
            "eval_loss": ratio(med("ftcore", "eval_loss"), med(other, "eval_loss")),
        }
    return out


def fmt_range(stat: dict[str, float] | None, spec: str, scale: float = 1.0) -> str:
    """``median (min-max)``, formatted with ``spec``."""
    if not stat:
        return "n/a"
    m, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    return f"{m:{spec}} ({lo:{spec}}-{hi:{spec}})"


CASE_TITLES = {"favorable": "Response-only loss, 16,384-token vocabulary (where ftcore's speedups matter most)",
               "least_favorable": "Loss on every token, 2,048-token vocabulary (where they matter least)"}


def case_markdown(case: dict[str, Any], mem_key: str) -> list[str]:
    s, summary = case["settings"], case["summary"]
    mem_name = "peak CUDA MiB" if mem_key == "peak_cuda_mb" else "peak RSS MiB"
    gpu = mem_key == "peak_cuda_mb"
    lines = [f"### {CASE_TITLES[s['case']]}", "",
             f"Base model's held-out loss before fine-tuning: {case['base'].get('eval_loss', float('nan')):.4f}. "
             f"TRL's candidates (one run each on a third of the examples, train s): "
             + ", ".join(f"{n} {r['train_s']:.0f}" if "error" not in r else f"{n} failed"
                         for n, r in case["trl_candidates"].items())
             + f"; best: {case['trl_winner']}.", "",
             f"| trainer | train s | real tok/s | supervised tok/s | padding share | {mem_name} | held-out loss |"
             + (" MFU |" if gpu else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for name in TRAINERS:
        t = summary.get(name) or {}
        label = {"recipe_as_written": "reference recipe as written (paged 8-bit AdamW)",
                 "trl_best": f"trl_best ({case['trl_winner']})"}.get(name, name)
        if not t.get("rounds"):
            lines.append(f"| {label} | failed | | | | | |" + (" |" if gpu else ""))
            continue
        row = (f"| {label} | {fmt_range(t.get('train_s'), '.0f')} | {fmt_range(t.get('real_tokens_per_s'), '.0f')} | "
               f"{fmt_range(t.get('supervised_tokens_per_s'), '.0f')} | "
               f"{fmt_range(t.get('padding_share'), '.1f', 100)}% | {fmt_range(t.get(mem_key), '.0f')} | "
               f"{fmt_range(t.get('eval_loss'), '.4f')} |")
        if gpu:
            row += f" {fmt_range(t.get('mfu'), '.1f', 100)}% |"
        lines.append(row)
    lines += ["", "| ftcore against (medians) | real tok/s | supervised tok/s | train time | peak memory | held-out loss |",
              "|---|---:|---:|---:|---:|---:|"]
    for other in ("reference", "trl_best"):
        r = case["comparison"][f"ftcore_vs_{other}"]
        f = lambda v: f"{v:.2f}x" if v is not None else "n/a"  # noqa: E731
        lines.append(f"| {other} | {f(r['real_tokens_per_s'])} | {f(r['supervised_tokens_per_s'])} | "
                     f"{f(r['train_time'])} | {f(r['peak_memory'])} | {f(r['eval_loss'])} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    mem_key = report["memory_metric"]
    head = [
        "# Benchmark results", "",
        f"Produced by `{report['command']}` on {report['machine']} at {report['finished']}, commit "
        f"{report['commit']['sha'][:12]}{' (with uncommitted changes)' if report['commit']['dirty'] else ''} "
        f"(" + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ").", ""]
    if not report["cases"]:
        return "\n".join([*head, *markdown_extras(report), ""])
    first = next(iter(report["cases"].values()))["settings"]
    m = report["model"]
    lines = head + [
        f"Model: Llama architecture, `{first['model_size']}` (hidden {m['hidden']}, {m['layers']} layers), built by "
        f"`benchmarks/make_data.py` and pretrained for {first['pretrain_tokens']:,} tokens of plain text in the data's "
        f"made-up language (no instructions). Data: {first['examples']} long-tailed alpaca records "
        f"(median {report['data']['median_tokens']} tokens, p90 {report['data']['p90_tokens']}, max "
        f"{report['data']['max_tokens']}; {report['data']['prompt_share']:.0%} of tokens are prompt), "
        f"{first['epochs']} epoch, max length {first['max_length']}, LoRA r=16 alpha=32 dropout 0.05 on q/k/v/o, lr "
        f"{first['learning_rate']:g} cosine with 3% warmup, {'bf16' if first['bf16'] else 'fp32'} on {first['device']}, "
        f"gradient checkpointing off and the trainer's default AdamW for every trainer but the recipe as written. "
        f"Each cell: the median of {report['rounds']} interleaved rounds, with the range in brackets. Held-out loss: "
        f"mean cross-entropy over the response tokens of {first['heldout']} fixed held-out records, computed by the "
        f"script the same way for all.", "",
        "## Summary", ""]
    for name in report["cases"]:
        lines += case_markdown(report["cases"][name], mem_key) + [""]
    lines += ["## Details", ""] + markdown_extras(report)
    lines += ["", "Columns: *real tok/s* = non-padding positions the model computed per second of "
              "`train_runtime`; *supervised tok/s* = positions with a loss target per second (the reference recipe "
              "supervises the prompt too, so its count includes prompt tokens); *padding share* = padding positions / "
              "all computed positions. MFU (GPU only) = (4 x frozen matmul parameters + 6 x trainable parameters + "
              "4 x output-layer parameters x the share of positions whose logits the trainer computes + 12 x layers x "
              "heads x head_dim x mean causal context) x real tokens / train time / the GPU's peak dense bf16 FLOP/s; "
              "embeddings are a lookup and not counted; ftcore computes logits at supervised positions only.", ""]
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
        if "ratio" in q and q.get("device") == "cpu" and q["ratio"] > 0.5:
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

    return {p: md.version(p) for p in ("ftcore", "transformers", "trl", "peft", "torch", "accelerate", "datasets",
                                       "bitsandbytes")}


def commit() -> dict[str, Any]:
    """The commit the benchmark ran from, and whether the tree had uncommitted changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE, timeout=30).stdout.strip()
        except OSError:
            return ""
    return {"sha": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain", "--", "ftcore",
                                                                             "ftcore_plugins", "benchmarks"))}


def run_case(case: str, args: argparse.Namespace, work: Path, timeout: float) -> dict[str, Any]:
    """One case: the base model's loss, TRL's candidates measured once, then interleaved rounds of every trainer."""
    s = case_settings(args, case)
    paths = make_data.generate(work, seed=s["seed"], max_words=s["max_words"])
    model_dir = make_data.build(work, s["model_size"], seed=s["seed"], vocab_size=s["vocab"],
                                max_positions=max(2048, s["max_length"]), pretrain_tokens=s["pretrain_tokens"])
    train = work / f"train-{s['examples']}.jsonl"
    train.write_text("\n".join(paths["train"].read_text(encoding="utf-8").splitlines()[: s["examples"]]) + "\n")
    heldout = work / f"heldout-{s['heldout']}.jsonl"
    heldout.write_text("\n".join(paths["heldout"].read_text(encoding="utf-8").splitlines()[: s["heldout"]]) + "\n")
    spec = {**s, "model": str(model_dir), "train": str(train), "heldout": str(heldout),
            "peak_tflops": args.peak_tflops}
    runs = work / "runs" / case
    out: dict[str, Any] = {"settings": s, "model_dir": str(model_dir)}
    out["base"] = run_worker("base", {**spec, "out": str(runs / "base")}, work, timeout, tag=case)
    third = work / f"train-{s['examples']}-third.jsonl"   # candidates are timed on a third of the examples
    third.write_text("\n".join(train.read_text(encoding="utf-8").splitlines()[: max(1, s["examples"] // 3)]) + "\n")
    out["trl_candidates"] = {
        name: run_worker("trl_best", {**spec, "train": str(third), "trl_candidate": name,
                                      "out": str(runs / f"trl-{name}")}, work, timeout, tag=f"{case}-{name}")
        for name in TRL_CANDIDATES}
    timed = {n: r["train_s"] for n, r in out["trl_candidates"].items() if "error" not in r}
    out["trl_winner"] = min(timed, key=timed.get) if timed else next(iter(TRL_CANDIDATES))
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in TRAINERS}
    for i in range(args.rounds):
        for name in TRAINERS:
            run_spec = {**spec, "trl_candidate": out["trl_winner"], "out": str(runs / name)}
            rounds[name].append(run_worker(name, run_spec, work, timeout, tag=f"{case}-{i + 1}"))
    out["rounds"] = rounds
    out["summary"] = {name: summarize(r) for name, r in rounds.items()}
    mem_key = "peak_cuda_mb" if s["device"] == "cuda" else "peak_rss_mb"
    out["comparison"] = compare(out["summary"], mem_key)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="ftcore vs the reference recipe vs TRL's best, side by side.")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (a tiny model, one round)")
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, the 1B Llama shape, max length 2048, MFU")
    ap.add_argument("--model-size", choices=sorted(make_data.MODEL_SIZES), help="override the model shape")
    ap.add_argument("--examples", type=int, help="training examples (same for all trainers)")
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--rounds", type=int, help="interleaved rounds of every trainer (default 3; --quick 1)")
    ap.add_argument("--only", help="comma-separated subset of: favorable,least_favorable,qlora")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s, when not in the table")
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
    args.rounds = args.rounds or (1 if args.quick else 3)
    work = Path(args.work)
    only = set(args.only.split(",")) if args.only else set(CASES)
    started = time.time()
    timeout = 3600
    report: dict[str, Any] = {
        "command": "python benchmarks/run.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU cores"
                   + (", " + __import__("torch").cuda.get_device_name() if args.gpu else ""),
        "finished": None, "commit": commit(), "versions": versions(), "rounds": args.rounds,
        "memory_metric": "peak_cuda_mb" if args.gpu else "peak_rss_mb", "cases": {}, "notes": [],
    }
    for case in CASES:
        if case in only:
            report["cases"][case] = run_case(case, args, work, timeout)
    if report["cases"]:
        first = next(iter(report["cases"].values()))
        model_dir = Path(first["model_dir"])
        report["model"] = model_summary(model_dir)
        report["data"] = data_summary(model_dir, work / f"train-{first['settings']['examples']}.jsonl")
    if "qlora" in only:
        spec = {**case_settings(args, "favorable"), "peak_tflops": args.peak_tflops}
        paths = make_data.generate(work, seed=spec["seed"], max_words=spec["max_words"])
        spec.update(train=str(paths["train"]), heldout=str(paths["heldout"]))
        report["qlora"] = qlora_comparison(spec, work, timeout)
    report["total_s"] = round(time.time() - started, 1)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    loads = [r.get("load_avg_start") for c in report["cases"].values() for rs in c["rounds"].values() for r in rs]
    busiest = max((x for x in loads if isinstance(x, (int, float))), default=0.0)
    if busiest > (os.cpu_count() or 1) * 1.2:
        report["notes"].append(f"the machine was shared at times (load average up to {busiest:.1f} on "
                               f"{os.cpu_count()} cores when a run started): absolute speeds are noisy; the rounds "
                               f"are interleaved so that a busy spell hits every trainer, and each run records its "
                               f"load average.")
    json_path = Path(args.json) if args.json else (work / "results-quick.json" if args.quick else HERE / "results.json")
    md_path = Path(args.markdown) if args.markdown else (work / "RESULTS-quick.md" if args.quick
                                                         else HERE / "RESULTS.md")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report) + kept_sections(md_path))
    print(md_path.read_text())
    print(f"[bench] wrote {json_path} and {md_path} in {report['total_s']:.0f} s")


def kept_sections(path: Path) -> str:
    """Sections of RESULTS.md that other scripts write (benchmarks/prepare.py's "## Data preparation"), kept
    when this script rewrites the file."""
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    start = text.find("\n## Data preparation")
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    return "\n" + text[start + 1: end + 1 if end >= 0 else len(text)].rstrip("\n") + "\n"


def qlora_comparison(spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """Peak memory of ftcore LoRA vs QLoRA on a model whose weights dominate memory (a few short steps)."""
    size = "medium" if spec["device"] == "cpu" else "1b"   # weights dominate memory at this size
    model_dir = make_data.build(work, size, seed=spec["seed"], max_positions=2048)
    train = work / "train-qlora.jsonl"
    lines = Path(spec["train"]).read_text(encoding="utf-8").splitlines()[:4]
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    q = {**spec, "model": str(model_dir), "train": str(train), "max_length": 128, "heldout": str(work / "heldout-qlora.jsonl")}
    Path(q["heldout"]).write_text("\n".join(Path(spec["heldout"]).read_text().splitlines()[:2]) + "\n")
    mem_key = "peak_cuda_mb" if spec["device"] == "cuda" else "peak_rss_mb"
    out: dict[str, Any] = {"model_size": size, "model_params": model_summary(model_dir)["params"],
                           "device": spec["device"]}
    for name in ("ftcore_lora", "ftcore_qlora"):
        out[name] = run_worker(name, {**q, "out": str(work / "runs" / name)}, work, timeout, tag="qlora")
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
