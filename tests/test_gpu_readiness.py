"""Paths that run only on NVIDIA GPUs, checked on a CPU machine: each test describes the GPU machine by mocking
the few ``torch.cuda`` answers that cannot exist here (availability, device count, compute capability, name)
and runs everything else for real (transformers' Trainer, PEFT, the collator, torch's gradient scaler)."""

from __future__ import annotations

import json

import pytest
import torch
from capture_plugin import Capture
from conftest import tiny_config

import ftcore
from ftcore.errors import ConfigError
from ftcore.training import devices, speedups
from ftcore.training.trainer import pick_precision, trainable_in_fp32


def describe_gpu(monkeypatch, capability=(8, 0), name="NVIDIA A100-SXM4-80GB", count=1):
    """A machine with ``count`` GPUs of this capability, as torch 2.13 answers for it (``is_bf16_supported()``
    answers True on every CUDA GPU, where bf16 is only emulated too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)


# -- precision --------------------------------------------------------------------------

@pytest.mark.parametrize("capability,name,expected", [
    ((7, 5), "Tesla T4", "fp16"), ((7, 0), "Tesla V100-SXM2-16GB", "fp16"),
    ((8, 0), "NVIDIA A100-SXM4-80GB", "bf16"), ((8, 9), "NVIDIA L4", "bf16"), ((9, 0), "NVIDIA H100 80GB HBM3", "bf16"),
])
def test_auto_precision_is_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, name, expected):
    describe_gpu(monkeypatch, capability, name)
    assert torch.cuda.is_bf16_supported()   # what the old choice asked, and why it chose bf16 on a T4
    assert pick_precision("auto") == expected
    from ftcore.tools.generate import pick_dtype

    assert pick_dtype("auto") == {"bf16": "bfloat16", "fp16": "float16"}[expected]


def test_bf16_asked_for_on_a_gpu_without_it_is_refused_with_what_to_set(monkeypatch):
    describe_gpu(monkeypatch, (7, 5), "Tesla T4")
    with pytest.raises(ConfigError) as err:
        pick_precision("bf16")
    assert "Tesla T4" in str(err.value) and '"fp16"' in str(err.value)
    assert pick_precision("fp16") == "fp16" and pick_precision("fp32") == "fp32"


def test_auto_precision_on_a_cpu_is_fp32_and_fp16_is_refused():
    if torch.cuda.is_available():
        pytest.skip("about machines without a GPU")
    assert pick_precision("auto") == "fp32"
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        pick_precision("fp16")


# -- one process, several GPUs ------------------------------------------------------------

def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_one_process_on_a_machine_with_four_gpus_trains_on_one(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    """transformers gives a lone process every GPU: it would wrap the model in DataParallel (which scatters the
    sparse loss's index tensor) and make each batch four times larger. The run trains as on one GPU."""
    from transformers import Trainer, TrainingArguments

    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "one", max_steps=3)
    cfg["plugins"] = ["lora", "alpaca"]
    one = ftcore.run(cfg, log=lambda m: None)

    # transformers reads the machine's GPU count here (the device stays the CPU: nothing can run on a GPU here)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, report_to="none")
    assert args.n_gpu == 4 and args.train_batch_size == 16
    bare = Trainer(model=torch.nn.Linear(2, 2), args=args)
    assert isinstance(bare._wrap_model(bare.model), torch.nn.DataParallel)   # what a run got before

    cap, lines = Capture(), []
    cfg["output_dir"] = str(tmp_path / "four")
    four = ftcore.run(cfg, plugins=[cap], log=lines.append)
    assert cap.trainer.args.n_gpu == 1
    assert not isinstance(cap.trainer.model_wrapped, torch.nn.DataParallel)
    assert cap.trainer._train_batch_size == 4
    assert any("sees 4 GPUs and trains on one" in line and "launch.num_processes=4" in line for line in lines)
    assert _losses(four.output_dir) == _losses(one.output_dir)


# -- flash attention for packed rows -------------------------------------------------------

@pytest.fixture
def flash_attn_installed(tmp_path, monkeypatch):
    """An importable ``flash_attn`` (its kernels cannot run here; only its presence is asked)."""
    package = tmp_path / "site" / "flash_attn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '2.8.3'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


@pytest.fixture
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


@pytest.mark.parametrize("precision,expected", [("bf16", True), ("fp16", True), ("fp32", False)])
def test_flash_attention_is_chosen_from_the_runs_settings_not_the_cpu_weights(monkeypatch, flash_attn_installed,
                                                                              lora_model, precision, expected):
    """The choice is made before the Trainer moves the model to the GPU: the model's fp32 CPU weights (or a
    QLoRA model's fp32 embedding) must not decide it."""
    describe_gpu(monkeypatch)
    assert next(lora_model.parameters()).device.type == "cpu" and next(lora_model.parameters()).dtype == torch.float32
    assert speedups.flash_attention_usable(precision) is expected


def test_flash_attention_needs_a_gpu_and_the_package(monkeypatch, flash_attn_installed, tmp_path):
    import importlib
    import sys

    assert not speedups.flash_attention_usable("bf16") or torch.cuda.is_available()   # this machine: no GPU
    describe_gpu(monkeypatch)
    assert speedups.flash_attention_usable("bf16")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "site")])   # uninstalled
    importlib.invalidate_caches()
    assert importlib.util.find_spec("flash_attn") is None
    assert not speedups.flash_attention_usable("bf16")


def test_apply_asks_for_flash_attention_on_a_gpu_machine(monkeypatch, flash_attn_installed, lora_model):
    """Where it was chosen, transformers itself checks the package: this fake one is refused, and the run keeps
    SDPA and says why (a real flash-attn build that does not fit torch is handled the same way)."""
    describe_gpu(monkeypatch)
    lines = []
    config = ftcore.RunConfig.model_validate({"model": "x"})
    assert speedups.apply(lora_model, config, lines.append, precision="bf16") is None
    assert lines and "kept sdpa" in lines[0] and "flash" in lines[0].lower()
    assert lora_model.get_base_model().config._attn_implementation == "sdpa"


def test_packed_batches_for_flash_attention_carry_the_boundaries_transformers_would_compute(lora_model):
    """cu_seq_lens from the collator (computed once on the CPU) equal what transformers derives from position_ids
    in every layer, and the model's forward hands them to the attention function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from ftcore.data.batching import PackedCollator, make_collator

    features = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (7, 3, 12)]
    batch = PackedCollator(flash_attention=True)(features)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 7, 10, 22] and batch["cu_seq_lens_k"].tolist() == cu_k.tolist()
    assert batch["max_length_q"] == max_q == 12 and batch["max_length_k"] == max_k
    assert "cu_seq_lens_q" not in PackedCollator()(features)   # SDPA needs none of it

    seen = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs.get("cu_seq_lens_q"))
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ftcore_test_probe", probe)
    base = lora_model.get_base_model()
    base.set_attn_implementation("ftcore_test_probe")
    try:
        base.config._attn_implementation = "flash_attention_2"   # what make_collator reads after speedups.apply
        collator = make_collator(True, None, lora_model, lambda m: None)
        assert collator.flash_attention
        base.config._attn_implementation = "ftcore_test_probe"
        with torch.no_grad():
            lora_model(**{k: v for k, v in collator(features).items() if k != "labels"})
    finally:
        base.set_attn_implementation("sdpa")
    assert len(seen) == base.config.num_hidden_layers and all(s.tolist() == [0, 7, 10, 22] for s in seen)


# -- fp16 and trainable copies of whole modules -------------------------------------------------

def _scaled_step(model, ids):
    scaler = torch.amp.GradScaler("cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()


def test_fp16_lora_with_modules_to_save_trains_its_copies_in_fp32(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def model():
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float16)
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                               task_type="CAUSAL_LM"))

    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model()
    assert any(p.dtype == torch.float16 for p in before.parameters() if p.requires_grad)   # PEFT's lm_head copy
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        _scaled_step(before, ids)

    fixed, lines = model(), []
    saved_copy = [n for n, p in fixed.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert trainable_in_fp32(fixed, "fp16", lines.append) > 0 and saved_copy
    assert all(p.dtype == torch.float32 for p in fixed.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float16 for p in fixed.parameters() if not p.requires_grad)   # the base stays fp16
    head = dict(fixed.named_parameters())[saved_copy[0]].detach().clone()
    _scaled_step(fixed, ids)
    assert not torch.equal(dict(fixed.named_parameters())[saved_copy[0]], head)   # it trained
    assert "kept in fp32" in lines[0]
    assert trainable_in_fp32(model(), "bf16", lines.append) == 0   # bf16 needs no scaler


# -- devices of several processes ----------------------------------------------------------------

def test_a_rank_given_one_gpu_through_cuda_visible_devices_uses_device_0(monkeypatch):
    describe_gpu(monkeypatch, count=1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert devices.local_device_index() == 0
    describe_gpu(monkeypatch, count=8)
    assert devices.local_device_index() == 3


# -- reported peak memory ------------------------------------------------------------------------

def test_a_paged_optimizers_state_counts_in_the_reported_cuda_peak(monkeypatch):
    """bitsandbytes' paged optimizers keep their state in CUDA managed memory, which torch's peak never sees;
    the tensors they page are registered with its page manager (a plain tensor stands in for one here)."""
    from bitsandbytes.functional import GlobalPageManager

    from ftcore.reporting.memory import peak_memory

    describe_gpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 10_000)
    manager = GlobalPageManager.get_instance()
    monkeypatch.setattr(manager, "paged_tensors", [torch.zeros(1024, dtype=torch.uint8), torch.zeros(256)])
    figures = peak_memory()
    assert figures["paged_optimizer_bytes"] == 1024 + 4 * 256
    assert figures["peak_cuda_bytes"] == 10_000 + 2048
    monkeypatch.setattr(manager, "paged_tensors", [])
    assert peak_memory()["peak_cuda_bytes"] == 10_000 and "paged_optimizer_bytes" not in peak_memory()


def test_a_launched_rank_loads_its_model_straight_onto_its_own_gpu(monkeypatch):
    """Under ZeRO-1/2 a rank that loaded onto the CPU would hold the whole model in host memory before DeepSpeed
    moved it (eight ranks, eight copies); ZeRO-3 builds the model sharded and takes no device map."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    describe_gpu(monkeypatch, count=8)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert devices.rank_device_map() is None            # one process: the Trainer moves its model
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert devices.rank_device_map() == {"": 3}
    describe_gpu(monkeypatch, count=1)                  # given its GPU through CUDA_VISIBLE_DEVICES
    assert devices.rank_device_map() == {"": 0}
    keep = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    try:
        assert devices.rank_device_map() is None
    finally:
        unset_hf_deepspeed_config()
        del keep
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.rank_device_map() is None            # CPU ranks (gloo): transformers' default


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_the_lora_and_full_plugins_load_a_ranks_model_with_its_device_map(monkeypatch, tiny_model_dir, adapter):
    """The map reaches transformers' from_pretrained (recorded there; the load itself stays on this CPU)."""
    import peft  # noqa: F401  (imported before torch.cuda is described: bitsandbytes picks its backend on import)
    from transformers import AutoModelForCausalLM

    from ftcore.models.tokenizer import load_tokenizer

    real = AutoModelForCausalLM.from_pretrained.__func__
    asked = []

    def from_pretrained(cls, *args, **kwargs):
        asked.append(kwargs.get("device_map"))
        return real(cls, *args, **(kwargs | {"device_map": None}))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    config, plugins = ftcore.resolve({"model": str(tiny_model_dir), "plugins": [adapter, "alpaca"]},
                                     log=lambda m: None)
    ctx = ftcore.RunContext(config=config, plugins=plugins, output_dir=tiny_model_dir.parent / "out",
                            log=lambda m: None)
    tokenizer = load_tokenizer(tiny_model_dir)
    describe_gpu(monkeypatch, count=4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    plugins.hook.ftcore_load_model(model_path=str(tiny_model_dir), tokenizer=tokenizer, config=config, ctx=ctx)
    assert asked == [{"": 2}]


def test_more_processes_than_the_machine_has_gpus_are_refused_before_launch(monkeypatch, tiny_model_dir,
                                                                           alpaca_file, tmp_path):
    describe_gpu(monkeypatch, count=2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run", max_steps=1)
    cfg["plugins"] = ["deepspeed-zero", "lora", "alpaca"]
    cfg["launch"] = {"num_processes": 4}
    with pytest.raises(ConfigError, match=r"4 process\(es\) on this machine, but it has 2 GPU") as err:
        ftcore.run(cfg, log=lambda m: None)
    assert "at most 2" in str(err.value)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=0,1"):
        ftcore.run(cfg, log=lambda m: None)
