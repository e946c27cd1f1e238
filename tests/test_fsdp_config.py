"""fsdp without launching: its section, the trainer's FSDP settings, and the combinations refused before launch.

The multi-process runs are in test_fsdp_ranks.py.
"""

from __future__ import annotations

import pytest
from conftest import tiny_config

import ftcore
from ftcore_plugins.strategies import fsdp


def resolved(tmp_path, section=None, plugins=("fsdp", "lora", "alpaca"), **top):
    cfg = tiny_config(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "out")
    cfg["plugins"] = list(plugins)
    if section is not None:
        cfg["fsdp"] = section
    cfg.update(top)
    config, plugins = ftcore.resolve(cfg, log=lambda m: None)
    return config, ftcore.RunContext(config=config, plugins=plugins, output_dir=tmp_path / "out")


def test_training_arguments_ask_transformers_for_fsdp2_of_the_decoder_layers(tmp_path):
    config, ctx = resolved(tmp_path, {"reshard_after_forward": False, "activation_checkpointing": True})
    ctx.state["fsdp_wrap"] = ["LlamaDecoderLayer"]      # what ftcore_model_loaded finds in the model
    args: dict = {"activation_checkpointing": False}
    fsdp.ftcore_training_arguments(args, config, ctx)
    assert args["fsdp"] is True
    assert args["fsdp_config"] == {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                   "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                   "reshard_after_forward": False, "cpu_offload": False,
                                   "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False,
                                   "activation_checkpointing": True}
    # FSDP's own checkpointing replaces the trainer's (both at once is an error in transformers)
    assert args["activation_checkpointing"] is False
    config, ctx = resolved(tmp_path)
    for trainer_setting, model_checkpoints, wanted in ((True, False, True), (False, False, False), (True, True, False)):
        ctx.state["fsdp_model_checkpoints"] = model_checkpoints     # qlora turns the model's own on
        args = {"activation_checkpointing": trainer_setting}
        fsdp.ftcore_training_arguments(args, config, ctx)
        assert args["fsdp_config"]["activation_checkpointing"] is wanted


def test_the_wrapped_layers_default_to_the_models_decoder_layer_class(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    config, ctx = resolved(tmp_path)
    fsdp.ftcore_model_loaded(model, ctx)
    assert ctx.state["fsdp_wrap"] == ["LlamaDecoderLayer"]
    config, ctx = resolved(tmp_path, {"wrap": ["LlamaBlock"]})
    with pytest.raises(ftcore.ConfigError, match="fsdp.wrap names LlamaBlock, which LlamaForCausalLM does not "
                                                 "contain; its layer classes include LlamaDecoderLayer"):
        fsdp.ftcore_model_loaded(model, ctx)


def test_qlora_stores_its_4bit_weights_in_the_compute_dtype_under_fsdp(tmp_path):
    import torch

    from ftcore_plugins.adapters import qlora

    for plugins, storage in ((("fsdp", "qlora", "alpaca"), torch.float32), (("qlora", "alpaca"), torch.uint8)):
        config, ctx = resolved(tmp_path, plugins=plugins)
        ctx.precision = "fp32"
        bnb = qlora.quantization_config(config.section("qlora"), ctx)
        assert bnb.bnb_4bit_quant_storage == storage, plugins


@pytest.mark.parametrize("plugins, section, reason", [
    (["fsdp", "deepspeed-zero", "lora", "alpaca"], None, "'fsdp' and 'deepspeed-zero' are both of kind 'strategy'"),
    (["fsdp", "lora", "alpaca", "paged-adamw-8bit"], None,
     '"paged-adamw-8bit" builds its own optimizer, which cannot be used with fsdp.*DTensor'),
    (["fsdp", "qlora", "alpaca"], {"cpu_offload": True}, '"qlora" loads 4-bit quantized weights, which FSDP cannot '
                                                          'offload'),
    (["fsdp", "lora", "alpaca"], {}, "fsdp shards the model across processes, and launch.num_processes is 1"),
], ids=["deepspeed-zero", "paged-adamw-8bit", "qlora-offload", "one-process"])
def test_combinations_that_cannot_work_are_refused_before_launch(plugins, section, reason, tiny_model_dir,
                                                                 alpaca_file, tmp_path):
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    cfg["plugins"] = plugins
    if section:
        cfg["fsdp"] = section
    cfg["launch"] = {"num_processes": 1 if section == {} else 2}
    with pytest.raises(ftcore.FtcoreError, match=reason):
        ftcore.run(cfg, log=lambda m: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="about machines without a GPU")
def test_gpu_only_settings_on_cpu_ranks_are_user_errors(tmp_path):
    config, ctx = resolved(tmp_path, {"cpu_offload": True})
    with pytest.raises(ftcore.ConfigError, match="fsdp.cpu_offload=true needs GPUs"):
        fsdp.check_combination(config, ctx)
    settings = fsdp.FsdpConfig(mixed_precision="bf16")
    with pytest.raises(ftcore.ConfigError, match='fsdp mixed precision "bf16" needs GPUs'):
        fsdp.mixed_precision(settings, "bf16")
    assert fsdp.mixed_precision(fsdp.FsdpConfig(), "fp32") == "no"
    with pytest.raises(ftcore.ConfigError, match='fsdp mixed precision "bf16" needs GPUs'):
        fsdp.mixed_precision(fsdp.FsdpConfig(), "bf16")     # auto follows training.precision


def test_bad_fsdp_settings_name_the_key(tiny_model_dir, alpaca_file, tmp_path):
    from click.testing import CliRunner

    from ftcore.cli import main

    result = CliRunner().invoke(main, ["run", "--plugins", "fsdp,lora,alpaca", "--model", str(tiny_model_dir),
                                       "--data", str(alpaca_file), "--output", str(tmp_path / "out"),
                                       "--set", "fsdp.mixed_precision=fp8"])
    assert result.exit_code == 2 and "fsdp.mixed_precision" in result.output, result.output
    assert "Traceback" not in result.output


def test_estimate_under_fsdp_is_one_processs_share():
    """Weights, gradients and optimizer state split among the processes, two decoder layers' weights gathered
    whole besides; activations are each process's own."""
    def rows(plugins, processes=None):
        result = ftcore.estimate("ftcore:tiny-llama", plugins, seq_len=64, batch=2, precision="fp32",
                                 device="cpu", log=lambda m: None, processes=processes)
        return result, {r["method"]: r for r in result["methods"]}

    _, alone = rows(["lora"])
    result, split = rows(["fsdp", "lora"], processes=2)
    assert result["processes"] == 2 and result["sharding"] == "fsdp"
    assert any(line.startswith("fsdp: FSDP2 shards every weight") for line in result["assumptions"])
    for method in ("lora", "qlora", "full"):
        one, two = alone[method], split[method]
        assert two["gradients"] == -(-one["gradients"] // 2) and two["optimizer"] == -(-one["optimizer"] // 2)
        assert two["activations"] == one["activations"]
        assert one["weights"] / 2 < two["weights"] < one["weights"], method
        assert any("per process of 2" in note for note in two["notes"])
    _, same = rows(["fsdp", "lora"], processes=1)
    assert same["full"]["weights"] == alone["full"]["weights"]


def test_the_ranks_ftcore_starts_on_cpus_get_a_fixed_mmap_threshold_unless_the_user_set_one(monkeypatch):
    """The launch sets MALLOC_MMAP_THRESHOLD_ for the ranks (glibc reads it as each starts) and puts the launching
    process's environment back after; a value of the user's own is left as it is (their trade of speed for
    memory), and each rank then leaves the threshold alone too."""
    import os

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with fsdp.fixed_mmap_threshold_in_ranks():
        assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    with fsdp.fixed_mmap_threshold_in_ranks():
        assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "33554432"
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "33554432"
    called = []
    monkeypatch.setattr(fsdp, "fixed_mmap_threshold", lambda: called.append(1) or True)

    class Ctx:
        rank, world_size, precision = 0, 2, "fp32"
        log = staticmethod(lambda m: called.append(m))

    monkeypatch.setattr(fsdp, "check_combination", lambda config, ctx: None)
    monkeypatch.setattr(fsdp, "mixed_precision", lambda settings, precision: "no")

    class Config:
        @staticmethod
        def section(name):
            return fsdp.FsdpConfig()

    fsdp.ftcore_run_started(Config(), Ctx())
    assert called == []                                   # the user's own value: no mallopt, no message
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    fsdp.ftcore_run_started(Config(), Ctx())
    assert called[0] == 1 and "mmap threshold fixed at 128 KiB" in called[1]   # a rank started otherwise


def test_the_mmap_threshold_is_fixed_once_never_raised_again_and_the_users_own_is_left_alone(tmp_path):
    """``ftcore.fix_mmap_threshold``: the loader's 4 MiB (while a quantized model loads) no longer undoes a lower
    threshold fsdp fixed in the rank before; a threshold the environment sets, either way, is the user's. Run in
    fresh processes: a fixed threshold stays for the rest of a process."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, ftcore\n"
        "from ftcore.models import loading\n"
        "first = ftcore.fix_mmap_threshold(131072)\n"
        "with loading.large_buffers_unmapped(True):\n"
        "    during = loading._FIXED\n"
        "print(json.dumps([first, during, ftcore.fix_mmap_threshold(1 << 20), loading._FIXED,"
        " ftcore.mmap_threshold_set_by_user()]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}

    def run(**extra):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             env={**env, **extra})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert run() == [True, 131072, True, 131072, False]
    assert run(MALLOC_MMAP_THRESHOLD_="33554432") == [False, None, False, None, True]
    assert run(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=33554432") == [False, None, False, None, True]
