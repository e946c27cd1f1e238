"""The qlora plugin: a 4-bit NF4 base (bitsandbytes, on this CPU), LoRA on top, adapters usable without 4-bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from capture_plugin import Capture, probe_ids
from conftest import tiny_config, write_jsonl

import ftcore
from ftcore.types import RunContext
from ftcore_plugins.adapters.qlora import keep_cpu_layout_trainable


def _load(tiny_model_dir, tmp_path, sections: dict):
    from transformers import AutoTokenizer

    from ftcore_plugins.adapters import qlora

    config, plugins = ftcore.resolve({"model": str(tiny_model_dir), "plugins": ["qlora"], **sections,
                                      "output_dir": str(tmp_path / "o")}, log=lambda m: None)
    ctx = RunContext(config=config, plugins=plugins, output_dir=tmp_path)
    ctx.tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return qlora.ftcore_load_model(model_path=str(tiny_model_dir), tokenizer=ctx.tokenizer, config=config, ctx=ctx)


def test_base_is_really_4bit_nf4_double_quant_with_lora_options(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    model = _load(tiny_model_dir, tmp_path, {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7          # every projection of both decoder layers is 4-bit
    state = layers[0].weight.quant_state
    assert layers[0].weight.dtype == torch.uint8 and state.quant_type == "nf4"
    assert state.nested, "double quantization is off"
    assert layers[0].compute_dtype == torch.float32      # no bf16 on this CPU: fp32
    assert model.base_model.model.is_gradient_checkpointing
    cfg = model.peft_config["default"]
    assert cfg.r == 4 and set(cfg.target_modules) == {"q_proj", "v_proj"} and cfg.lora_alpha == 32
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_weights_of_every_layer_learn_after_an_evaluation_pass(tiny_model_dir, tmp_path):
    """Regression: bitsandbytes' CPU inference layout (taken on a no-grad eval pass) cut the gradients."""
    model = _load(tiny_model_dir, tmp_path, {"lora": {"r": 4}})
    ids = probe_ids(256)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * 4
    assert all(g is not None and g.abs().sum() > 0 for g in lora_b.values()), \
        [n for n, g in lora_b.items() if g is None or not g.abs().sum()]


def test_fp4_and_single_quantization_are_selectable(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    model = _load(tiny_model_dir, tmp_path, {"qlora": {"quant_type": "fp4", "double_quant": False}})
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.weight.quant_state.quant_type == "fp4" and not layer.weight.quant_state.nested


def test_compute_dtype_follows_bf16_where_supported(tiny_model_dir, tmp_path):
    from ftcore_plugins.adapters.qlora import QLoraConfig, compute_dtype

    class Ctx:
        precision = "bf16"

    assert compute_dtype(QLoraConfig(), Ctx()) == torch.bfloat16
    Ctx.precision = "fp32"
    assert compute_dtype(QLoraConfig(), Ctx()) == torch.float32
    assert compute_dtype(QLoraConfig(compute_dtype="float16"), Ctx()) == torch.float16


def test_saved_adapter_reproduces_the_4bit_logits_with_plain_peft(tiny_model_dir, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cap = Capture()
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", learning_rate=1e-3)
    cfg["plugins"] = ["qlora", "alpaca"]
    result = ftcore.run(cfg, plugins=[cap], log=lambda m: None)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=q,
                                                device_map={"": "cpu"})
    keep_cpu_layout_trainable(base)     # as in training: the same 4-bit kernels, not the CPU inference one
    probe = probe_ids(base.config.vocab_size)
    with torch.no_grad():
        base_logits = base.eval()(input_ids=probe).logits.float()
        logits = PeftModel.from_pretrained(base, str(result.model_dir)).eval()(input_ids=probe).logits
    assert not torch.allclose(base_logits, cap.logits, atol=1e-4), "training changed nothing: nothing to compare"
    torch.testing.assert_close(logits.float(), cap.logits, atol=1e-4, rtol=1e-4)


def _chat_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "You add numbers."},
                          {"role": "user", "content": f"What is {a} plus {a}?"},
                          {"role": "assistant", "content": f"It is {2 * a}."}]} for a in range(n)]


def test_cli_qlora_chatml_alone_and_the_adapter_loads_on_the_unquantized_base(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "chat.jsonl", _chat_records(16))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ftcore.cli", "run", "--plugins", "qlora,chatml", "--model", str(tiny_model_dir),
         "--data", str(data), "--output", str(out), "--set", "training.epochs=1", "--set", "training.batch_size=4",
         "--set", "training.gradient_accumulation=1", "--set", "training.learning_rate=1e-3",
         "--set", "data.val_size=4", "--set", "data.max_length=128", "--set", "lora.r=8"],
        capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "trainable params:" in proc.stderr
    assert [p["name"] for p in json.loads((out / "plugins.json").read_text())] == ["qlora", "chatml"]
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8

    tok = AutoTokenizer.from_pretrained(str(adapter))          # holds the ChatML tokens chatml added
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    assert len(tok) > base.config.vocab_size
    base.resize_token_embeddings(len(tok))
    probe = probe_ids(len(tok))
    with torch.no_grad():
        before = base(input_ids=probe).logits
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        after = model(input_ids=probe).logits
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = next(k for k in saved if "q_proj.lora_B" in k)
    loaded = dict(model.named_parameters())
    name = next(n for n in loaded if n.endswith(lora_b.replace(".weight", ".default.weight").split("base_model.model.")[-1]))
    torch.testing.assert_close(loaded[name], saved[lora_b])
    assert saved[lora_b].abs().sum() > 0 and torch.isfinite(after).all()
    assert not torch.allclose(before, after, atol=1e-5)       # the adapter is applied on full-precision weights


def _views_of_mapped_checkpoints(model) -> list[str]:
    """Names of the model's tensors whose storage lies in a safetensors file mapped into this process."""
    from memory_probe import mapped_file_ranges

    ranges = mapped_file_ranges()
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if any(a <= t.untyped_storage().data_ptr() < b for a, b in ranges)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_4bit_model_is_read_not_mapped_and_equals_the_mapped_load(tiny_model_dir, tmp_path):
    """The qlora plugin reads the checkpoint instead of mapping it; the weights are the same bits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ftcore.models.loading import load_base_model
    from ftcore_plugins.adapters.qlora import QLoraConfig, quantization_config

    model = _load(tiny_model_dir, tmp_path, {"lora": {"r": 4}})
    assert _views_of_mapped_checkpoints(model) == []

    config, plugins = ftcore.resolve({"model": str(tiny_model_dir), "output_dir": str(tmp_path / "o")},
                                     log=lambda m: None)

    class Ctx:
        precision = "fp32"

    Ctx.plugins = plugins          # no strategy plugin: the 4-bit weights are stored as uint8
    kwargs = dict(dtype=torch.float32, device_map={"": "cpu"}, quantization_config=quantization_config(QLoraConfig(), Ctx()))
    ours = load_base_model(str(tiny_model_dir), AutoTokenizer.from_pretrained(str(tiny_model_dir)), config, Ctx(),
                           quantized_on_load=True, **kwargs)
    assert _views_of_mapped_checkpoints(ours) == []
    assert ours.name_or_path == ours.config.name_or_path == str(tiny_model_dir)   # PEFT records it in the adapter
    assert ours.generation_config.to_dict() == GenerationConfig.from_pretrained(str(tiny_model_dir)).to_dict()
    # transformers' own (mapped) load: the fp32 tensors it does not quantize stay views of the file
    mapped = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), **kwargs)
    assert "model.embed_tokens.weight" in _views_of_mapped_checkpoints(mapped)
    theirs, ours = mapped.state_dict(), ours.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key            # 4-bit or not, every tensor is bit-equal


HEAP_CHURN = """
import ctypes, sys, torch
from ftcore.models.loading import large_buffers_unmapped

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

first = torch.empty(30 << 20, dtype=torch.uint8).fill_(1); del first   # glibc raises its threshold to 30 MiB
before = anon()
kept, mapped = [], 0
with large_buffers_unmapped(sys.argv[1] == "on"):
    for mib in range(5, 21):            # as when quantizing on load: a large buffer freed, a small tensor kept
        outside = libc.mallinfo2().hblkhd
        big = torch.empty(mib << 20, dtype=torch.uint8).fill_(1)
        mapped += libc.mallinfo2().hblkhd - outside >= mib << 20   # a mapping of its own, unmapped when freed
        kept.append(torch.ones(16 << 10, dtype=torch.uint8))
        del big
print(mapped, (anon() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_buffers_freed_while_loading_leave_the_process():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's allocator")

    def churn(mode: str) -> tuple[int, int]:
        """How many of the 16 large buffers had a mapping of their own, and the MiB of RSS the loop left."""
        out = subprocess.run([sys.executable, "-c", HEAP_CHURN, mode], capture_output=True, text=True, check=True)
        mapped, retained = out.stdout.split()[-2:]
        return int(mapped), int(retained)

    # Without it, glibc's raised threshold serves every large buffer from the heap, where what is freed may stay
    # between the kept tensors (how much stays depends on where each kept tensor lands: not asserted).
    assert churn("off")[0] == 0
    mapped, retained = churn("on")
    assert mapped == 16 and retained < 10   # each large buffer had its own mapping, returned when freed
