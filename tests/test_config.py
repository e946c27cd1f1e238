"""Layering, defaults, validation errors with suggestions, --set, --dry-run."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

import ftcore
from ftcore.cli import main
from ftcore.config.layering import parse_set

QUIET = {"log": lambda m: None}


def resolve(raw=None, flags=None):
    return ftcore.resolve(raw if raw is not None else {"model": "m"}, flags, **QUIET)


def test_defaults_follow_the_reference_recipe():
    config, chosen = resolve()
    t, d = config.training, config.data
    assert (t.epochs, t.batch_size, t.gradient_accumulation, t.learning_rate) == (3, 4, 4, 2e-4)
    assert (t.warmup_ratio, t.lr_scheduler, t.logging_steps, t.save_strategy) == (0.03, "cosine", 10, "epoch")
    assert t.precision == "auto" and d.max_length == 2048 and d.val_size > 0
    lora = config.section("lora")
    assert (lora.r, lora.alpha, lora.dropout) == (16, 32, 0.05)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert set(chosen.names()) == {"lora", "alpaca"}


def test_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"model": "m", "training": {"learning_rate": 1e-4, "epochs": 2},
                                 "lora": {"r": 8}}))
    config, _ = ftcore.resolve(str(f), parse_set(["training.epochs=5", "lora.alpha=16"]), **QUIET)
    assert config.training.learning_rate == 1e-4      # file beats default
    assert config.training.epochs == 5                # flag beats file
    assert config.section("lora").r == 8 and config.section("lora").alpha == 16
    assert config.training.batch_size == 4            # default survives


def test_set_parses_yaml_values_and_dotted_keys():
    assert parse_set(["a.b.c=3", "x=true", "l=[q_proj, v_proj]", "s=hello"]) == {
        "a": {"b": {"c": 3}}, "x": True, "l": ["q_proj", "v_proj"], "s": "hello"}
    with pytest.raises(ftcore.ConfigError, match="KEY=VALUE"):
        parse_set(["novalue"])


@pytest.mark.parametrize("raw, expected", [
    ({"model": "m", "trainig": {}}, 'unknown config key "trainig". Did you mean "training"?'),
    ({"model": "m", "training": {"learning_rat": 1}}, 'unknown config key "training.learning_rat". Did you mean "learning_rate"?'),
    ({"model": "m", "lora": {"rank": 8}}, 'unknown config key "lora.rank"'),
    ({"model": "m", "training": {"epochs": "three"}}, 'config key "training.epochs"'),
    ({"model": "m", "training": {"learning_rate": -1}}, 'config key "training.learning_rate": Input should be greater than 0'),
    ({"model": "m", "lora": {"r": 0}}, 'config key "lora.r"'),
    ({"model": "m", "data": {"too_long": "cut"}}, "config key \"data.too_long\""),
    ({"training": {}}, "no model given"),
    ({"model": "m", "full": {}}, 'section "full" belongs to plugin "full", which this run does not use'),
])
def test_validation_errors_name_the_key(raw, expected):
    with pytest.raises(ftcore.ConfigError) as err:
        resolve(raw)
    assert expected in str(err.value)


def test_high_learning_rate_warns():
    seen = []
    ftcore.resolve({"model": "m", "training": {"learning_rate": 1e-3}}, log=seen.append)
    assert any("above 0.0005" in m for m in seen)


def test_plugins_from_file_and_flag(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: m\nplugins: [full, chatml]\n")
    config, chosen = ftcore.resolve(str(f), **QUIET)
    assert set(chosen.names()) == {"full", "chatml"}
    config, chosen = ftcore.resolve(str(f), {"plugins": ["lora", "alpaca"]}, **QUIET)
    assert set(chosen.names()) == {"lora", "alpaca"}


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: m\ntraining:\n  epochs: [1\n")
    with pytest.raises(ftcore.ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        ftcore.resolve(str(f), **QUIET)


def test_dry_run_prints_resolved_config_and_plugins_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--model", "m", "--data", "t.jsonl", "--output", str(out),
                                       "--plugins", "lora,chatml", "--set", "lora.r=4", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "#   lora" in result.output and "#   chatml" in result.output
    body = yaml.safe_load(result.output)
    assert body["lora"]["r"] == 4 and body["data"]["datasets"][0]["path"] == "t.jsonl"
    assert body["plugins"] == ["lora", "chatml"]
    assert not out.exists()


def test_cli_user_error_exits_2_without_traceback():
    result = CliRunner().invoke(main, ["run", "--model", "m", "--set", "training.epochs=-1", "--dry-run"])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
