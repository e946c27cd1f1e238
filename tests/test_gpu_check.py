"""benchmarks/gpu_check.py, the prepared GPU check, run through its CPU smoke path: the same workers, trainers,
measurements and JSON as on a GPU, with a tiny model (no GPU here; see docs/performance.md for what ran where)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_both_trainers_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--only",
                           "lora,attention", "--examples", "16", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"ftcore-lora", "trl-lora"}
    for name, run in report["runs"].items():
        assert run["examples_seen"] == 16 and run["real_tokens"] > 0 and run["real_tokens_per_s"] > 0, name
        assert run["flops_per_token"] > 0 and run["estimate"]["total_mb"] > 0
        assert run["flash_attention"] is False   # no GPU, no flash-attn: and the check says so
    assert report["runs"]["ftcore-lora"]["attention"] == "ftcore_packed_sdpa"
    assert report["runs"]["ftcore-lora"]["head_positions_share"] < 1   # logits only where supervised
    assert report["runs"]["trl-lora"]["head_positions_share"] == 1
    assert "CUDA only" in report["attention"]["skipped"]
    assert "| lora | ftcore |" in proc.stdout and "| lora | trl |" in proc.stdout


def _benchmark_run_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return run


def test_mfu_peaks_match_gpu_names_word_by_word():
    """Substrings gave an "NVIDIA L40" the L4's 121 TFLOP/s and every H100 the SXM figure."""
    run = _benchmark_run_module()
    assert run.peak_tflops("NVIDIA L4") == 121
    assert run.peak_tflops("NVIDIA L40") == 181
    assert run.peak_tflops("NVIDIA L40S") == 362
    assert run.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert run.peak_tflops("NVIDIA H100 PCIe") == 756
    assert run.peak_tflops("NVIDIA H100 NVL") == 835
    assert run.peak_tflops("NVIDIA A10G") == 70 and run.peak_tflops("NVIDIA A10") == 125
    assert run.peak_tflops("NVIDIA A100-SXM4-80GB") == run.peak_tflops("NVIDIA A100 80GB PCIe") == 312
    assert run.peak_tflops("Some Future GPU") is None     # unknown: MFU left out, --peak-tflops to give it


def test_mfu_counts_the_output_layer_only_where_logits_are_computed():
    """ftcore computes logits only at supervised positions: its FLOPs count the output layer there alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"],
                                                                 task_type="CAUSAL_LM"))
    run = _benchmark_run_module()
    every, supervised = run.flops_per_token(model, 100, 1.0), run.flops_per_token(model, 100, 0.25)
    assert every["head_params"] == supervised["head_params"] == 1000 * 64
    assert every["flops_per_token"] - supervised["flops_per_token"] == 4 * 1000 * 64 * 0.75
    assert every["trainable_params"] == 2 * (4 * 64 + 64 * 4)      # q_proj's A and B in two layers
