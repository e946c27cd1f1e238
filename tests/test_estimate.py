"""The memory estimator: from a model's config alone, checked against real peaks and the recipe's table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_jsonl
from ftcore.cli import main
from ftcore.estimate import estimate

# Llama-2-7B's architecture, as in its config.json.
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
GB = 1e9


def test_llama2_7b_lands_in_the_reference_recipes_ranges():
    """The recipe's settings: batch 4 x 2048 tokens, bf16, gradient checkpointing (as it advises), AdamW."""
    result = estimate(LLAMA2_7B, seq_len=2048, batch=4, gradient_checkpointing=True, precision="bf16")
    assert result["params"] == 6_738_415_616
    totals = {r["method"]: r["total"] / GB for r in result["methods"]}
    assert totals["full"] >= 120
    assert 16 <= totals["lora"] <= 24
    assert 8 <= totals["qlora"] <= 12
    lora = next(r for r in result["methods"] if r["method"] == "lora")
    assert lora["trainable_params"] == 32 * 4 * 16 * (4096 + 4096)        # r=16 on q/k/v/o, as PEFT counts
    full = next(r for r in result["methods"] if r["method"] == "full")
    assert full["gradients"] == 4 * 6_738_415_616 and full["optimizer"] == 8 * 6_738_415_616


def test_options_move_the_figures_the_right_way():
    base = {r["method"]: r for r in estimate(LLAMA2_7B)["methods"]}
    ckpt = {r["method"]: r for r in estimate(LLAMA2_7B, gradient_checkpointing=True)["methods"]}
    assert ckpt["lora"]["activations"] < base["lora"]["activations"] / 4
    assert ckpt["qlora"]["activations"] == base["qlora"]["activations"]       # qlora always checkpoints
    longer = {r["method"]: r for r in estimate(LLAMA2_7B, seq_len=4096)["methods"]}
    assert longer["lora"]["activations"] == pytest.approx(2 * base["lora"]["activations"], rel=1e-9)
    eight = {r["method"]: r for r in estimate(LLAMA2_7B, plugins=["full", "paged-adamw-8bit"])["methods"]}
    assert list(eight) == ["full", "lora", "qlora"]                         # all three, always
    assert [m for m, r in eight.items() if r["selected"]] == ["full"]       # the one named is marked
    assert eight["full"]["optimizer"] < base["full"]["optimizer"] / 3.9
    wide = {r["method"]: r for r in estimate(LLAMA2_7B, plugins=["lora"],
                                              settings={"lora": {"r": 8, "target_modules": "all-linear"}})["methods"]}
    assert wide["lora"]["trainable_params"] == 32 * 8 * (4 * 8192 + 3 * (4096 + 11008))
    assert wide["qlora"]["trainable_params"] == wide["lora"]["trainable_params"]   # qlora reads the lora section
    assert (wide["lora"]["adapter_rank"], wide["lora"]["adapter_targets"]) == (8, "all-linear")
    assert wide["full"]["adapter_rank"] is None


def test_cli_reads_a_folder_without_weights_a_config_path_or_a_builtin(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))        # a config and nothing else: no weights
    runner = CliRunner()
    by_folder = runner.invoke(main, ["estimate", "--model", str(folder), "--json"])
    by_file = runner.invoke(main, ["estimate", "--model", str(folder / "config.json"), "--json",
                                   "--plugins", "qlora", "--seq-len", "1024", "--batch", "2",
                                   "--gradient-checkpointing"])
    assert by_folder.exit_code == 0 and by_file.exit_code == 0, by_folder.output + by_file.output
    rows = json.loads(by_folder.output)["methods"]
    assert [r["method"] for r in rows] == ["full", "lora", "qlora"]
    assert all(set(r) >= {"weights", "gradients", "optimizer", "activations", "total"} for r in rows)
    picked = json.loads(by_file.output)
    # `--plugins qlora` still shows every method (the recipe's table), with qlora marked as the chosen one
    assert [r["method"] for r in picked["methods"]] == ["full", "lora", "qlora"] and picked["seq_len"] == 1024
    assert picked["selected"] == ["qlora"] and [r["selected"] for r in picked["methods"]] == [False, False, True]
    assert all(r["gradient_checkpointing"] for r in picked["methods"])
    assert picked["assumptions"]
    table = runner.invoke(main, ["estimate", "-m", "ftcore:tiny-llama", "--precision", "fp32"])
    assert table.exit_code == 0, table.output
    for word in ("weights", "gradients", "optimizer", "activations", "full", "lora", "qlora", "Assumptions"):
        assert word in table.output
    assert "*" not in table.output        # nothing named with --plugins: no method marked
    marked = runner.invoke(main, ["estimate", "-m", str(folder), "--plugins", "qlora,chatml"])
    assert marked.exit_code == 0, marked.output
    assert "* qlora" in marked.output and "* lora" not in marked.output and "full" in marked.output


@pytest.mark.parametrize("args, expect", [
    (["--model", "/no/such/model"], "no such model folder"),
    (["--model", "ftcore:tiny-llama", "--plugins", "qlorra"], 'Did you mean "qlora"'),
    (["--model", "ftcore:tiny-llama", "--set", "lora.target_modules=[nothing_proj]"],
     'plugin "lora": no linear layer of the model matches its adapter targets'),
    (["--model", "ftcore:tiny-llama", "--set", "lora.rr=8"], 'Did you mean "r"'),
    (["--model", "ftcore:tiny-llama", "--set", "training.precision=auto"], "training precision"),
    (["--model", "ftcore:tiny-llama", "--batch", "0"], "must be positive"),
])
def test_bad_input_is_a_clear_error(args, expect):
    result = CliRunner().invoke(main, ["estimate", *args])
    assert result.exit_code == 2 and expect in result.output and "Traceback" not in result.output


# -- against reality -------------------------------------------------------------------

SEQ, BATCH = 128, 4


def _run_config(model: Path, data: Path, out: Path, method: str, steps: int, batch: int, length: int) -> dict:
    return {"plugins": [method, "alpaca"], "model": str(model), "output_dir": str(out),
            "alpaca": {"train_on_inputs": True},
            "data": {"datasets": [str(data)], "max_length": length, "val_size": 0, "packing": False, "cache": False},
            "training": {"max_steps": steps, "batch_size": batch, "gradient_accumulation": 1, "save_strategy": "no",
                         "eval_strategy": "no", "logging_steps": 1, "gradient_checkpointing": True}}


@pytest.mark.slow
def test_estimate_is_within_35_percent_of_measured_peaks(tmp_path):
    """Two real steps per method, every sequence SEQ tokens, in a fresh process (tests/memory_probe.py)."""
    import torch

    from ftcore.testing import build_model, build_tokenizer

    model = build_model(tmp_path / "model", build_tokenizer(), hidden_size=256, layers=4, heads=4, kv_heads=2,
                        intermediate_size=688)
    words = " ".join(f"word{i} and more" for i in range(SEQ))          # longer than SEQ tokens: truncated to it
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": words, "output": words}] * (2 * BATCH))
    methods = ["full", "lora", "qlora"]
    spec = {"warmup": _run_config(model, data, tmp_path / "warmup", "lora", 1, 1, 32),
            "runs": [_run_config(model, data, tmp_path / m, m, 2, BATCH, SEQ) for m in methods]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")   # freed tensors go back to the system at once
    probe = Path(__file__).with_name("memory_probe.py")
    proc = subprocess.run([sys.executable, str(probe), str(tmp_path / "spec.json")], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["runs"]
    on_gpu = measured[0]["device"] == "cuda"
    precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    for method, got in zip(methods, measured):
        rows = estimate(str(model), [method], seq_len=SEQ, batch=BATCH, gradient_checkpointing=True,
                        precision=precision)["methods"]
        est = next(r for r in rows if r["method"] == method)
        ratio = est["total"] / got["peak"]
        assert 0.65 <= ratio <= 1.35, f"{method}: estimate {est['total'] / 1e6:.1f} MB, measured " \
                                      f"{got['peak'] / 1e6:.1f} MB ({got})"
