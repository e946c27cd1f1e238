"""ftcore init: commented starter configs that run as written once model and data are filled in."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from ftcore.cli import main
from ftcore.config import CORE_KEYS, RunConfig
from ftcore.init_cli import DATA_PLACEHOLDER, MODEL_PLACEHOLDER, TEMPLATES
from ftcore.plugins import installed_entry_points


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
    """qlora and deepspeed-zero come from other plugins: until installed, the run names them as missing."""
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


def test_lora_alpaca_template_runs_as_written(tmp_path, tiny_model_dir, alpaca_file):
    """The default template, with only model and data filled in (by the flags), trains for real."""
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "ftcore.cli"]
    proc = subprocess.run([*cmd, "init", "--model", str(tiny_model_dir), "--data", str(alpaca_file)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ftcore.yaml").exists() and "FILL IN" in (tmp_path / "ftcore.yaml").read_text()
    proc = subprocess.run([*cmd, "run", "ftcore.yaml", "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "runs" / "lora-alpaca"
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "report.html").exists()
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["metrics"]["epochs"] == 3 and summary["metrics"]["eval_loss"] is not None
