"""deepspeed-zero without launching: the generated DeepSpeed config, the launch settings, refusals.

The multi-process runs are in test_deepspeed_ranks.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_config

import ftcore
from ftcore.cli import main
from ftcore_plugins.strategies import deepspeed_zero

FIXTURE = Path(__file__).parent / "deepspeed_fixture"


def resolved(tmp_path, section=None, plugins=("deepspeed-zero", "lora", "alpaca"), **top):
    cfg = tiny_config(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "out")
    cfg["plugins"] = list(plugins)
    if section is not None:
        cfg["deepspeed-zero"] = section
    cfg.update(top)
    return ftcore.resolve(cfg, log=lambda m: None)


def ds_config(tmp_path, section=None):
    config, _ = resolved(tmp_path, section)
    return deepspeed_zero.deepspeed_config(config.section("deepspeed-zero"))


def test_run_settings_are_auto_and_zero_defaults(tmp_path):
    ds = ds_config(tmp_path)
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
    assert ds["gradient_clipping"] == "auto"
    assert ds["bf16"] == {"enabled": "auto"} and ds["fp16"] == {"enabled": "auto"}
    assert "train_batch_size" not in ds          # DeepSpeed derives it from micro batch x accumulation x ranks
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": "auto"}
    assert "optimizer" not in ds                 # the trainer's AdamW, built from training.*


def test_stage3_gathers_weights_on_save_and_offloads(tmp_path):
    ds = ds_config(tmp_path, {"stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu", "overlap_comm": True,
                              "stage3_max_live_parameters": 1000})
    zero = ds["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert zero["overlap_comm"] is True and zero["stage3_max_live_parameters"] == 1000
    assert zero["stage3_prefetch_bucket_size"] == "auto" and zero["stage3_param_persistence_threshold"] == "auto"
    # Offloaded optimizer state needs DeepSpeed's CPU optimizer, its settings filled from training.*
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                          "weight_decay": "auto"}}


def test_user_json_may_keep_torch_adamw_for_offload(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_force_ds_cpu_optimizer": False}))
    ds = ds_config(tmp_path, {"offload_optimizer": "cpu", "config_file": str(user)})
    assert "optimizer" not in ds and ds["zero_force_ds_cpu_optimizer"] is False


def test_nvme_offload_needs_stage3_and_a_path(tmp_path):
    nvme = tmp_path / "nvme"
    ds = ds_config(tmp_path, {"stage": 3, "offload_param": "nvme", "nvme_path": str(nvme)})
    assert ds["zero_optimization"]["offload_param"]["nvme_path"] == str(nvme)
    with pytest.raises(ftcore.ConfigError, match="nvme_path"):
        ds_config(tmp_path, {"stage": 3, "offload_optimizer": "nvme"})
    with pytest.raises(ftcore.ConfigError, match="needs stage 3"):
        ds_config(tmp_path, {"stage": 2, "offload_optimizer": "nvme", "nvme_path": str(nvme)})
    with pytest.raises(ftcore.ConfigError, match="offload_param=cpu needs stage 3"):
        ds_config(tmp_path, {"stage": 2, "offload_param": "cpu"})


def test_user_json_is_merged_under_explicit_keys(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "overlap_comm": False, "sub_group_size": 1000},
        "comms_logger": {"enabled": True}, "train_micro_batch_size_per_gpu": "auto",
    }))
    ds = ds_config(tmp_path, {"config_file": str(user), "overlap_comm": True})
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3                       # from the file: stage was not set in the section
    assert zero["overlap_comm"] is True             # set in the section: wins over the file
    assert zero["sub_group_size"] == 1000 and ds["comms_logger"] == {"enabled": True}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    ds = ds_config(tmp_path, {"config_file": str(user), "stage": 2})
    assert ds["zero_optimization"]["stage"] == 2 and "stage3_prefetch_bucket_size" not in ds["zero_optimization"]


@pytest.mark.parametrize("key, value, owner", [
    ("train_micro_batch_size_per_gpu", 8, "training.batch_size"),
    ("gradient_clipping", 0.5, "training.max_grad_norm"),
    ("bf16", {"enabled": True}, "training.precision"),
    ("optimizer", {"type": "AdamW", "params": {"lr": 1e-3}}, "training.learning_rate"),
])
def test_user_json_may_not_disagree_with_the_run(tmp_path, key, value, owner):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({key: value}))
    with pytest.raises(ftcore.ConfigError, match=f"fills from {owner}") as err:
        ds_config(tmp_path, {"config_file": str(user)})
    assert str(user) in str(err.value)


def test_bad_user_json_is_a_config_error_before_anything_runs(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{ not json")
    with pytest.raises(ftcore.ConfigError, match="deepspeed-zero.config_file.*not valid JSON"):
        resolved(tmp_path, {"config_file": str(bad)})
    with pytest.raises(ftcore.ConfigError, match="not found"):
        resolved(tmp_path, {"config_file": str(tmp_path / "missing.json")})


def test_launch_flags_become_the_launch_section(tiny_model_dir, alpaca_file, tmp_path):
    hostfile = tmp_path / "hosts"
    args = ["run", "--plugins", "deepspeed-zero,lora,alpaca", "--model", str(tiny_model_dir), "--data",
            str(alpaca_file), "--output", str(tmp_path / "out"), "--num-processes", "16", "--num-machines", "2",
            "--machine-rank", "1", "--main-process-ip", "10.0.0.1", "--main-process-port", "29600",
            "--hostfile", str(hostfile), "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["launch"] == {"num_processes": 16, "num_machines": 2, "machine_rank": 1,
                                 "main_process_ip": "10.0.0.1", "main_process_port": 29600,
                                 "hostfile": str(hostfile)}
    bad = CliRunner().invoke(main, args[:-1] + ["--machine-rank", "2", "--dry-run"])
    assert bad.exit_code == 2 and "machine_rank 2 must be below num_machines 2" in bad.output
    uneven = CliRunner().invoke(main, args[:-1] + ["--num-processes", "3", "--dry-run"])
    assert uneven.exit_code == 2 and "multiple of num_machines" in uneven.output


def test_many_processes_need_a_launching_strategy(tiny_model_dir, alpaca_file, tmp_path):
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    cfg["launch"] = {"num_processes": 2}
    with pytest.raises(ftcore.ConfigError, match="needs a strategy plugin that launches processes"):
        ftcore.run(cfg, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_plugin_objects_cannot_cross_into_launched_ranks(tiny_model_dir, alpaca_file, tmp_path):
    class Local:
        name = "local-thing"

        @ftcore.hookimpl
        def ftcore_run_started(self):
            pass

    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    cfg["plugins"] = ["deepspeed-zero", "lora", "alpaca"]
    with pytest.raises(ftcore.PluginError, match="local-thing.*entry point"):
        ftcore.run(cfg, plugins=[Local()], log=lambda m: None)


def test_output_dir_is_checked_before_launching(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = tiny_config(tiny_model_dir, alpaca_file, out)
    cfg["plugins"] = ["deepspeed-zero", "lora", "alpaca"]
    with pytest.raises(ftcore.ConfigError, match="already holds files"):
        ftcore.run(cfg, log=lambda m: None)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not list(tmp_path.glob(".out.launch-*"))


@pytest.fixture
def test_plugins(monkeypatch):
    """The test-only plugins in tests/deepspeed_fixture, found through their entry points."""
    monkeypatch.syspath_prepend(str(FIXTURE))


def test_client_optimizer_plugin_is_refused_with_zero(test_plugins, tiny_model_dir, alpaca_file, tmp_path):
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    cfg["plugins"] = ["deepspeed-zero", "dstest-sgd", "lora", "alpaca"]
    with pytest.raises(ftcore.ConfigError, match='"dstest-sgd" builds its own optimizer.*ZeRO owns the optimizer'):
        ftcore.run(cfg, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_quantized_adapter_is_refused_with_stage3_only(test_plugins, tiny_model_dir, alpaca_file, tmp_path):
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    cfg["plugins"] = ["deepspeed-zero", "dstest-4bit", "alpaca"]
    cfg["deepspeed-zero"] = {"stage": 3}
    with pytest.raises(ftcore.ConfigError, match='"dstest-4bit" loads 4-bit quantized base weights.*stage=2'):
        ftcore.run(cfg, log=lambda m: None)
    assert not (tmp_path / "out").exists()
    cfg["deepspeed-zero"] = {"stage": 2}
    config, plugins = ftcore.resolve(cfg, log=lambda m: None)
    ds = deepspeed_zero.deepspeed_config(config.section("deepspeed-zero"))
    ctx = ftcore.RunContext(config=config, plugins=plugins, output_dir=tmp_path / "out")
    deepspeed_zero.check_combination(config, ctx, ds)     # stage 2 keeps 4-bit weights whole: allowed


def test_hostfile_command_names_every_machine_and_the_rendezvous(tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes, 8 GPUs each\nnode-a slots=8\nnode-b slots=8\n")
    launch = ftcore.RunConfig.model_validate({"model": "m", "launch": {
        "hostfile": str(hosts), "main_process_ip": "10.0.0.1", "main_process_port": 29600,
        "num_processes": 16, "num_machines": 2}}).launch
    argv = ["-m", "ftcore.cli", "run", "/shared/run.yaml"]
    cmd = deepspeed_zero.deepspeed_launcher_command(argv, launch)
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    joined = " ".join(cmd)
    assert f"--hostfile {hosts}" in joined and "--master_addr 10.0.0.1" in joined
    assert "--master_port 29600" in joined and "--num_nodes 2" in joined and "--num_gpus 8" in joined
    assert "--no_ssh_check" not in cmd and "--no_local_rank" in cmd
    assert cmd[-4:] == ["--module", "ftcore.cli", "run", "/shared/run.yaml"]
    hosts.write_text("node-a slots=8\nnode-b eight\n")
    with pytest.raises(ftcore.ConfigError, match=r"hostfile:2: expected 'HOST slots=N'"):
        deepspeed_zero.deepspeed_launcher_command(argv, launch)


@pytest.mark.parametrize("plugins, stage, reason", [
    (["deepspeed-zero", "lora", "alpaca", "paged-adamw-8bit"], 2,
     '"paged-adamw-8bit" builds its own optimizer.*ZeRO owns the optimizer'),
    (["deepspeed-zero", "qlora", "alpaca"], 3, '"qlora" loads 4-bit quantized base weights.*stage=2'),
], ids=["paged-adamw-8bit", "qlora-zero3"])
def test_bundled_plugins_that_cannot_work_with_zero_are_refused(plugins, stage, reason, tiny_model_dir,
                                                                 alpaca_file, tmp_path):
    """The bundled plugins themselves, not only the test stand-ins: refused with the reason, nothing written."""
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    cfg["plugins"] = plugins
    cfg["deepspeed-zero"] = {"stage": stage}
    with pytest.raises(ftcore.ConfigError, match=reason):
        ftcore.run(cfg, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_qlora_with_zero2_is_allowed(tmp_path):
    """qlora + ZeRO-1/2 works (run with two ranks in test_deepspeed_ranks.py): the combination check lets it through."""
    for stage in (1, 2):
        config, plugins = resolved(tmp_path, {"stage": stage}, plugins=("deepspeed-zero", "qlora", "alpaca"))
        ds = deepspeed_zero.deepspeed_config(config.section("deepspeed-zero"))
        ctx = ftcore.RunContext(config=config, plugins=plugins, output_dir=tmp_path / "out")
        deepspeed_zero.check_combination(config, ctx, ds)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="about machines without a GPU")
def test_bf16_or_fp16_on_cpu_ranks_is_a_user_error():
    """DeepSpeed's CPU accelerator trains in fp32: a GPU config's precision is refused in the rank, by name."""
    deepspeed_zero.check_precision("fp32")
    for precision in ("bf16", "fp16"):
        with pytest.raises(ftcore.ConfigError, match=f'training.precision "{precision}" with deepspeed-zero needs GPUs'):
            deepspeed_zero.check_precision(precision)
