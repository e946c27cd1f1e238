"""ftcore init: commented starter configs that run as written once model and data are filled in."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from conftest import write_jsonl

from ftcore.cli import main
from ftcore.config.schema import CORE_KEYS, RunConfig
from ftcore.registry.discovery import installed_entry_points
from ftcore.tools.templates import DATA_PLACEHOLDER, MODEL_PLACEHOLDER, TEMPLATES


def _init(tmp_path, *args):
    res = CliRunner().invoke(main, ["init", *args])
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_template_is_commented_yaml_with_valid_core_keys(template, tmp_path):
    target = tmp_path / f"{template}.yaml"
    res = _init(tmp_path, str(target), "--template", template)
    assert "fill in model and data" in res.stderr
    text = target.read_text()
    assert text.count("# FILL IN:") == 2 and MODEL_PLACEHOLDER in text and DATA_PLACEHOLDER in text
    assert f"ftcore run {target.name} --dry-run" in text          # says how to check it
    raw = yaml.safe_load(text)
    config = RunConfig.model_validate({k: v for k, v in raw.items() if k in CORE_KEYS})
    assert config.model.path == MODEL_PLACEHOLDER and config.data.datasets[0].path == DATA_PLACEHOLDER
    assert config.training.learning_rate <= 5e-4
    # plugin sections belong to plugins the template selects
    assert set(raw) - set(CORE_KEYS) <= set(raw["plugins"])
    # every uncommented key line of the core sections explains itself or is a plain recipe value
    for line in text.splitlines():
        if re.match(r"^\w+:", line) and not line.startswith(("plugins", "model", "output_dir")):
            assert line.rstrip().endswith(":"), line       # sections only at the top level


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_filled_template_passes_dry_run_when_its_plugins_are_installed(template, tmp_path, tiny_model_dir,
                                                                        alpaca_file):
    """All three templates' plugins are bundled; a trimmed install without one names it as missing."""
    target = tmp_path / "cfg.yaml"
    _init(tmp_path, str(target), "--template", template)
    text = target.read_text().replace(MODEL_PLACEHOLDER, str(tiny_model_dir)).replace(DATA_PLACEHOLDER,
                                                                                       str(alpaca_file))
    target.write_text(text)
    res = CliRunner().invoke(main, ["run", str(target), "--dry-run"])
    wanted = yaml.safe_load(text)["plugins"]
    missing = [p for p in wanted if p not in installed_entry_points()]
    if missing:
        assert res.exit_code == 2 and f'unknown plugin "{missing[0]}"' in res.stderr
    else:
        assert res.exit_code == 0, res.output
        resolved = yaml.safe_load(res.stdout)
        assert set(wanted) <= set(resolved["plugins"]) and resolved["model"]["path"] == str(tiny_model_dir)


def test_init_never_overwrites_without_force(tmp_path):
    target = tmp_path / "ftcore.yaml"
    target.write_text("mine\n")
    res = CliRunner().invoke(main, ["init", str(target)])
    assert res.exit_code == 2 and "already exists" in res.stderr and target.read_text() == "mine\n"
    _init(tmp_path, str(target), "--force", "--template", "deepspeed")
    assert "deepspeed-zero" in target.read_text()


def test_init_lists_templates():
    res = CliRunner().invoke(main, ["init", "--list"])
    assert res.exit_code == 0 and [line.split()[0] for line in res.stdout.splitlines()] == list(TEMPLATES)


def _chat_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "You add numbers."},
                          {"role": "user", "content": f"What is {a} plus {a}?"},
                          {"role": "assistant", "content": f"It is {2 * a}."}]} for a in range(n)]


RUNS_AS_WRITTEN = [
    # template, extra `ftcore run` arguments the template's own header says to use, its output dir, its adapter
    pytest.param("lora-alpaca", [], "runs/lora-alpaca", id="lora-alpaca"),
    pytest.param("qlora-chatml", [], "runs/qlora-chatml", id="qlora-chatml"),   # bitsandbytes 4-bit, on this CPU
    pytest.param("deepspeed", ["--num-processes", "2"], "runs/lora-deepspeed", id="deepspeed",
                 marks=pytest.mark.slow),                                          # two ZeRO ranks over gloo
]


@pytest.mark.parametrize("template, run_args, out_dir", RUNS_AS_WRITTEN)
def test_template_runs_as_written(template, run_args, out_dir, tmp_path, tiny_model_dir, alpaca_file):
    """Each template, with only model and data filled in (by the flags), trains for real as its header says."""
    data = alpaca_file if template != "qlora-chatml" else write_jsonl(tmp_path / "chat.jsonl", _chat_records(24))
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "ftcore.cli"]
    proc = subprocess.run([*cmd, "init", "--template", template, "--model", str(tiny_model_dir), "--data", str(data)],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "ftcore.yaml").read_text()
    assert "FILL IN" in text and MODEL_PLACEHOLDER not in text and DATA_PLACEHOLDER not in text
    proc = subprocess.run([*cmd, "run", "ftcore.yaml", "--no-progress", *run_args], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / out_dir
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "report.html").exists()
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["metrics"]["epochs"] == 3 and summary["metrics"]["eval_loss"] is not None
    plugins = [p["name"] for p in yaml.safe_load((out / "plugins.json").read_text())]
    assert set(yaml.safe_load(text)["plugins"]) <= set(plugins)
