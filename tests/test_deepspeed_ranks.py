"""deepspeed-zero with real ranks: two CPU processes running DeepSpeed ZeRO over gloo.

Each test launches through `ftcore run` as a user would; the ranks find the test-only
plugins in tests/deepspeed_fixture through PYTHONPATH, like any installed plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import tiny_config

import ftcore
from ftcore_plugins.strategies.deepspeed_zero import free_port

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "deepspeed_fixture"
# Two ranks of batch 2 see the same global batch of 4 as one process of batch 4.
SETTINGS = ["training.epochs=2", "training.batch_size=2", "training.gradient_accumulation=1",
            "training.logging_steps=1", "training.learning_rate=1e-3", "training.save_strategy='no'",
            "data.val_size=4", "data.max_length=128", "lora.dropout=0"]


def ftcore_cli(args: list[str], env_extra: dict | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FIXTURE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_extra or {})
    popen.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "ftcore.cli", "run", *args], env=env, text=True,
                            stderr=subprocess.STDOUT, **popen)


def finish(procs: list[subprocess.Popen], timeout: int = 900) -> list[str]:
    """Wait for the commands (killing them all if one runs over) and return their output."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                for child in psutil.Process(p.pid).children(recursive=True):
                    child.kill()
                p.kill()


def run_cli(args: list[str], **kw) -> tuple[int, str]:
    proc = ftcore_cli(args, **kw)
    output = finish([proc])[0]
    return proc.returncode, output


def base_args(model: Path, data: Path, out: Path, plugins: str, settings=SETTINGS) -> list[str]:
    args = ["--plugins", plugins, "--model", str(model), "--data", str(data), "--output", str(out)]
    for s in settings:
        args += ["--set", s]
    return args


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out) if "loss" in r]


# Two ZeRO ranks against one process on the same global batch: measured here at most 1.6e-7 apart (the order in
# which float sums are reduced across ranks). 1e-5 leaves room for other CPUs' summation orders and stays far
# below what a real difference moves: 4-bit weights instead of 16/32-bit move these losses ~1.5e-3.
ZERO2_REL = 1e-5
OFFLOAD_REL = 1e-5   # DeepSpeedCPUAdam against torch's AdamW: measured 1.6e-7 as well


def assert_same_losses(got: list[float], want: list[float], rel: float) -> None:
    """Loss for loss, within ``rel``; prints the largest relative difference (what each tolerance rests on)."""
    assert len(got) == len(want) > 0
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    print(f"largest relative loss difference: {worst:.2e} (tolerance {rel:.0e})")
    assert worst <= rel, f"losses differ by up to {worst:.2e} (> {rel:.0e}):\n{got}\n{want}"


def assert_learned(out: Path) -> None:
    losses = train_losses(out)
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    assert summary["eval_loss"] < summary["eval_loss_start"]


def assert_adapter_loads_with_peft(adapter: Path, base: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(weights) == 2 * 4 * 2          # 2 layers x q/k/v/o x lora_A/lora_B, none left empty by sharding
    assert all(t.numel() > 0 for t in weights.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in weights.items())   # trained
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits).all()


_ONE_PROCESS: dict[tuple[str, str, str], ftcore.RunResult] = {}


def one_process_run(model: Path, data: Path, out: Path, adapter: str = "lora") -> ftcore.RunResult:
    """The two-rank runs' settings in one process without DeepSpeed, on the same global batch (4).

    Run once per model, data and adapter in a test session: the two-rank tests of deepspeed-zero and fsdp all
    compare with the same few one-process runs (the output folder of the first test that asked is kept until the
    session ends)."""
    key = (str(model), data.read_text(), adapter)
    if key not in _ONE_PROCESS:
        cfg = tiny_config(model, data, out, epochs=2, batch_size=4, learning_rate=1e-3)
        cfg["plugins"] = [adapter, "alpaca"]
        cfg["lora"] = {"dropout": 0}
        _ONE_PROCESS[key] = ftcore.run(cfg, log=lambda m: None)
    return _ONE_PROCESS[key]


def assert_only_rank0_wrote(out: Path) -> None:
    rows = metrics(out)
    keys = [(r["step"], tuple(sorted(k for k in r if k in ("loss", "eval_loss")))) for r in rows]
    # one row per logging event (the final evaluation repeats the last epoch's), not one per rank
    assert len([k for k in keys if "loss" in k[1]]) == len({k for k in keys if "loss" in k[1]})
    assert not list(out.parent.glob(f".{out.name}.launch-*"))     # the launch file is gone


def test_zero2_lora_two_ranks_match_one_rank(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "zero2"
    status, output = run_cli(base_args(tiny_model_dir, alpaca_file, out, "deepspeed-zero,lora,alpaca")
                             + ["--num-processes", "2"])
    assert status == 0, output
    assert "launching 2 process(es) with DeepSpeed ZeRO stage 2" in output
    assert "[rank 1] trainable params:" in output            # both ranks' logs are streamed
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert_learned(out)
    assert_only_rank0_wrote(out)
    assert_adapter_loads_with_peft(out / "adapter", tiny_model_dir)

    # The same global batch (4) in one process without DeepSpeed: the same losses.
    one = one_process_run(tiny_model_dir, alpaca_file, tmp_path / "one")
    assert_same_losses(train_losses(out), train_losses(one.output_dir), rel=ZERO2_REL)
    assert_same_losses([json.loads((out / "summary.json").read_text())["metrics"]["eval_loss"]],
                       [one.metrics["eval_loss"]], rel=ZERO2_REL)
    # both with the chunked loss (the default): under ZeRO the model runs up to its output layer in the engine
    assert json.loads((out / "summary.json").read_text())["metrics"]["loss"]["path"] == "chunked"
    assert one.metrics["loss"]["path"] == "chunked"



@pytest.mark.parametrize("stage", [1, 2], ids=["zero1", "zero2"])
def test_qlora_zero_two_ranks_match_one_rank(stage, tiny_model_dir, alpaca_file, tmp_path):
    """qlora + ZeRO-1/2, the combinations PEFT documents for quantized adapters: each rank holds the whole 4-bit
    base (bitsandbytes' CPU backend) and ZeRO shards the LoRA weights' optimizer state (and, at stage 2,
    gradients). The losses are those of a one-process qlora run on the same global batch, not plain lora's."""
    out = tmp_path / f"qlora-zero{stage}"
    status, output = run_cli(base_args(tiny_model_dir, alpaca_file, out, "deepspeed-zero,qlora,alpaca")
                             + ["--set", f"deepspeed-zero.stage={stage}", "--num-processes", "2"])
    assert status == 0, output
    assert f"launching 2 process(es) with DeepSpeed ZeRO stage {stage}" in output
    assert "[rank 1] trainable params:" in output
    assert_learned(out)
    assert_only_rank0_wrote(out)
    assert_adapter_loads_with_peft(out / "adapter", tiny_model_dir)     # onto the unquantized base

    one_rank = {adapter: train_losses(one_process_run(tiny_model_dir, alpaca_file, tmp_path / f"one-{adapter}",
                                                      adapter).output_dir)
                for adapter in ("qlora", "lora")}
    losses = train_losses(out)
    assert_same_losses(losses, one_rank["qlora"], rel=ZERO2_REL)     # measured here: 1.6e-7 apart
    # The ranks really ran 4-bit: quantization moves the tiny model's losses ~1.5e-3 away from plain lora's.
    assert max(abs(a - b) / b for a, b in zip(losses, one_rank["lora"])) > 5e-4



def assert_full_model_saved(model: Path, base: Path) -> None:
    """A full fine-tune saved as a normal safetensors model: the base model's tensors, trained, loadable."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(str(model / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}
    assert any(not saved[k].equal(original[k]) for k in original)
    net = AutoModelForCausalLM.from_pretrained(str(model), use_safetensors=True)
    with torch.no_grad():
        assert torch.isfinite(net(torch.tensor([[1, 5, 9, 12]])).logits).all()


@pytest.mark.parametrize("adapter, stage", [("lora", 1), ("full", 2)], ids=["lora-zero1", "full-zero2"])
def test_zero1_lora_and_full_zero2_on_two_ranks(adapter, stage, tiny_model_dir, alpaca_file, tmp_path):
    """The two combinations the recipe lists besides the ones above: each finishes, learns and saves a loadable
    adapter or model, written by rank 0 only."""
    out = tmp_path / f"{adapter}-zero{stage}"
    full_settings = [s for s in SETTINGS if not s.startswith(("lora.", "training.learning_rate"))]
    settings = SETTINGS if adapter == "lora" else full_settings     # full: the default learning rate
    status, output = run_cli(base_args(tiny_model_dir, alpaca_file, out, f"deepspeed-zero,{adapter},alpaca", settings)
                             + ["--set", f"deepspeed-zero.stage={stage}", "--num-processes", "2"])
    assert status == 0, output
    assert f"launching 2 process(es) with DeepSpeed ZeRO stage {stage}" in output
    assert "[rank 1] trainable params:" in output
    assert json.loads((out / "deepspeed.json").read_text())["zero_optimization"]["stage"] == stage
    assert_learned(out)
    assert_only_rank0_wrote(out)
    if adapter == "lora":
        assert_adapter_loads_with_peft(out / "adapter", tiny_model_dir)
    else:
        assert_full_model_saved(out / "model", tiny_model_dir)


def test_zero2_lora_offloaded_to_deepspeeds_cpu_adam(tiny_model_dir, alpaca_file, tmp_path):
    """offload_optimizer: cpu with DeepSpeed's default optimizer for offloaded state, DeepSpeedCPUAdam (a C++ op
    DeepSpeed compiles on first use, a minute or two here): the ranks step it, and the losses are those of a
    one-process run with torch's AdamW on the same global batch."""
    out = tmp_path / "offloaded"
    plugins = "deepspeed-zero,lora,alpaca,dstest-probe-optimizer"
    status, output = run_cli(base_args(tiny_model_dir, alpaca_file, out, plugins)
                             + ["--set", "deepspeed-zero.offload_optimizer=cpu", "--num-processes", "2"],
                             env_extra={"FTCORE_TEST_PROBE_DIR": str(tmp_path)})
    assert status == 0, output
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["optimizer"]["type"] == "AdamW"
    for rank in (0, 1):
        assert "DeepSpeedCPUAdam" in json.loads((tmp_path / f"optimizer-rank{rank}.json").read_text())
        # the probe adjusts the training arguments too: an extension, run in each rank beside deepspeed-zero
        assert json.loads((tmp_path / f"arguments-rank{rank}.json").read_text()) == {"has_deepspeed": True,
                                                                                    "world_size": 2}
    assert_learned(out)
    assert_only_rank0_wrote(out)
    assert_adapter_loads_with_peft(out / "adapter", tiny_model_dir)
    one = one_process_run(tiny_model_dir, alpaca_file, tmp_path / "one")
    assert_same_losses(train_losses(out), train_losses(one.output_dir), rel=OFFLOAD_REL)



def test_zero3_lora_offloaded_on_two_machines(tiny_model_dir, alpaca_file, tmp_path):
    """Two `ftcore run` commands, one per machine (here both on localhost), as the multi-node recipe says;
    optimizer state and weights offloaded to CPU memory, with the trainer's AdamW allowed by the user's own
    DeepSpeed JSON (the default, DeepSpeedCPUAdam, is a C++ op DeepSpeed compiles on first use)."""
    port = free_port()
    out = tmp_path / "zero3"
    own = tmp_path / "ds.json"        # the user's own DeepSpeed JSON: torch's AdamW on the offloaded state
    own.write_text(json.dumps({"zero_force_ds_cpu_optimizer": False}))
    args = base_args(tiny_model_dir, alpaca_file, out, "deepspeed-zero,lora,alpaca") + [
        "--set", "deepspeed-zero.stage=3", "--set", "deepspeed-zero.offload_optimizer=cpu",
        "--set", "deepspeed-zero.offload_param=cpu", "--set", f"deepspeed-zero.config_file={own}",
        "--set", "training.loss_chunk_size=16",      # the chunked loss in many chunks, under sharded parameters
        "--num-processes", "2", "--num-machines", "2",
        "--main-process-ip", "127.0.0.1", "--main-process-port", str(port)]
    machines = [ftcore_cli(args + ["--machine-rank", str(rank)]) for rank in (0, 1)]
    outputs = finish(machines)
    assert [m.returncode for m in machines] == [0, 0], "\n\n".join(outputs)
    assert "on machine 1 of 2" in outputs[1] and "[rank 1] trainable params:" in outputs[1]
    assert "ftcore run summary" in outputs[0] and "ftcore run summary" not in outputs[1]   # rank 0 (machine 0) saves and reports
    ds = json.loads((out / "deepspeed.json").read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False and "optimizer" not in ds
    assert json.loads((out / "summary.json").read_text())["metrics"]["loss"]["chunk_size"] == 16
    assert_learned(out)
    assert_only_rank0_wrote(out)
    assert_adapter_loads_with_peft(out / "adapter", tiny_model_dir)


REMOTE_SHELL = Path(__file__).resolve().parent / "remote_shell"   # stand-ins for pdsh and ssh: every host is here


def test_a_hostfile_of_two_machines_starts_a_rank_on_each(tiny_model_dir, alpaca_file, tmp_path):
    """The hostfile path for real: DeepSpeed's launcher reads two hosts (this machine under two names), starts
    each "machine" through pdsh and its launcher there, and the two ranks train together. Only the remote shell
    (pdsh over ssh) is stood in for, since no second machine exists here."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "two-machines"
    path = os.pathsep.join([str(REMOTE_SHELL), os.environ.get("PATH", "")])
    status, output = run_cli(base_args(tiny_model_dir, alpaca_file, out, "deepspeed-zero,lora,alpaca")
                             + ["--hostfile", str(hostfile), "--main-process-ip", "127.0.0.1"],
                             env_extra={"PATH": path})
    assert status == 0, output
    assert "launching on 2 host(s)" in output
    assert "localhost: " in output and "127.0.0.1: " in output          # a "machine" each (pdsh's prefixes)
    assert "[rank 1] trainable params:" in output
    assert_learned(out)
    assert_only_rank0_wrote(out)
    one = one_process_run(tiny_model_dir, alpaca_file, tmp_path / "one")
    assert_same_losses(train_losses(out), train_losses(one.output_dir), rel=ZERO2_REL)


def test_zero3_full_through_a_hostfile_saves_a_normal_model(tiny_model_dir, alpaca_file, tmp_path, monkeypatch,
                                                            capfd):
    """From the library this time: ftcore.run launches, waits, and returns what rank 0 wrote."""
    from safetensors.torch import load_file

    monkeypatch.syspath_prepend(str(FIXTURE))                 # the test plugins, here and in the ranks
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FIXTURE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FTCORE_TEST_PROBE_DIR", str(tmp_path))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "full"
    cfg = tiny_config(tiny_model_dir, alpaca_file, out, epochs=2, batch_size=2)
    cfg["plugins"] = ["deepspeed-zero", "full", "alpaca", "dstest-probe-export"]
    cfg["deepspeed-zero"] = {"stage": 3}
    cfg["launch"] = {"hostfile": str(hostfile)}
    # the chunked loss in chunks of 16 positions, its trained output layer sharded: each chunk recomputed in backward
    cfg["training"]["loss_chunk_size"] = 16
    logged: list[str] = []
    result = ftcore.run(cfg, log=logged.append)
    output = capfd.readouterr()
    assert result.exit_code == 0, output.out + output.err
    assert any("with DeepSpeed's launcher" in line for line in logged)
    assert "[rank 1] trainable params:" in output.out + output.err
    assert_learned(out)
    assert result.model_dir == out / "model" and result.metrics["steps"] == 10
    assert (result.metrics["loss"]["path"], result.metrics["loss"]["chunk_size"]) == ("chunked", 16)
    saved = load_file(str(out / "model" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in base.items()}   # gathered, not shards
    assert any(not saved[k].equal(base[k]) for k in base)                                 # and trained
    for rank in (0, 1):   # built inside zero.Init: each rank held about half the weights from the start
        loaded = json.loads((tmp_path / f"loaded-rank{rank}.json").read_text())
        assert loaded["full"] == sum(v.numel() for v in base.values()) and loaded["local"] < 0.6 * loaded["full"]
    # Rank 0 left its process group before exiting (not left to teardown, where it once aborted a finished
    # rank) and would have shown its Python stacks had it died of a signal; rank 1, done once rank 0's save
    # was gathered, exited at once without the interpreter's teardown (its atexit handlers never ran).
    assert json.loads((tmp_path / "exit-rank0.json").read_text()) == {"in_process_group": False,
                                                                      "faulthandler": True}
    assert not (tmp_path / "exit-rank1.json").exists()
    probe = json.loads((out / "probe-export.json").read_text())
    assert probe["rank"] == "0" and probe["parameters"] == sum(v.numel() for v in base.values())
    assert result.exports == [out / "probe-export.json"]


def test_a_failing_rank_stops_the_whole_run(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "fails"
    log = tmp_path / "output.txt"
    with open(log, "w") as sink:
        proc = ftcore_cli(base_args(tiny_model_dir, alpaca_file, out, "deepspeed-zero,lora,alpaca,dstest-fail")
                          + ["--num-processes", "2"],
                          env_extra={"FTCORE_TEST_FAIL_RANK": "1", "FTCORE_TEST_FAIL_STEP": "2"}, stdout=sink)
        ranks: set[int] = set()
        failed_at = None
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            try:      # remember the ranks' pids, to check that none is left behind
                ranks.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
            if failed_at is None and "injected failure" in log.read_text():
                failed_at = time.time()
            time.sleep(0.25)
        finish([proc], timeout=1)
    ended = time.time()
    output = log.read_text()
    if failed_at is None and "injected failure" in output:
        failed_at = ended      # the run ended between two polls, within 0.25 s of the failure: prompt
    assert proc.returncode == 1, output                       # the failing rank's own exit status
    assert "RuntimeError: injected failure on rank 1 at step 2" in output
    assert "rank 1 failed with exit status 1" in output
    assert failed_at is not None and ended - failed_at < 60, "rank 0 was left waiting in a collective"
    assert ranks and not [p for p in ranks if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


APP = '''
import json, sys
import torch.distributed as dist
import ftcore

config, folder = sys.argv[1:]
cfg = json.load(open(config))
for name in ("first", "second"):
    cfg["output_dir"] = f"{folder}/{name}"
    result = ftcore.run(cfg, log=lambda message: None)
    print(json.dumps({"run": name, "rank": dist.get_rank(), "exit_code": result.exit_code,
                      "in_process_group": dist.is_initialized()}), flush=True)
'''


def test_an_application_under_torchrun_runs_twice_in_its_own_process_group(tiny_model_dir, alpaca_file, tmp_path):
    """Embedding ftcore in an application that launches its own ranks: ftcore.run in each rank uses the ranks
    it is in (no launch of its own), leaves the application's process group up, and a second run in the same
    processes trains exactly like the first (no state of the first run leaks into it)."""
    from procs import env

    script, config = tmp_path / "app.py", tmp_path / "run.json"
    script.write_text(APP)
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "first", epochs=2, batch_size=2, learning_rate=1e-3)
    cfg.update(plugins=["deepspeed-zero", "lora", "alpaca"], lora={"dropout": 0})
    config.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), str(script), str(config), str(tmp_path)],
                            env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = finish([proc])[0]
    assert proc.returncode == 0, output
    rows = [json.loads(line) for line in output.splitlines() if line.startswith('{"run"')]
    assert sorted((r["run"], r["rank"]) for r in rows) == [("first", 0), ("first", 1), ("second", 0), ("second", 1)]
    assert all(r["exit_code"] == 0 and r["in_process_group"] for r in rows), rows
    first, second = tmp_path / "first", tmp_path / "second"
    assert_learned(first)
    assert train_losses(second) == pytest.approx(train_losses(first), rel=1e-5)
    assert json.loads((second / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    assert_adapter_loads_with_peft(second / "adapter", tiny_model_dir)
