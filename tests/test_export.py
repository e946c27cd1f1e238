"""Exporters get what they need: the finished run's result and configuration, the --output path, one
merge for every exporter of a run, and a failure that leaves the run's summary and report intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_config

import ftcore
from ftcore.cli import main
from ftcore.errors import PluginFailure
from ftcore.testing import finished_run, run_exporter


class Inspector:
    """An exporter that records what it was given."""

    name = "inspector"

    def __init__(self) -> None:
        self.seen: dict = {}

    @ftcore.hookimpl
    def ftcore_export(self, run_dir, model_dir, config, ctx):
        self.seen = {"lr": config.training.learning_rate, "output_dir": config.output_dir,
                     "plugins": ctx.plugins.names(), "export_output": ctx.export_output,
                     "metrics": dict(ctx.result.metrics), "data_stats": dict(ctx.result.data_stats),
                     "model_dir": Path(model_dir), "run_dir": Path(run_dir)}
        return []


def test_standalone_export_gets_the_runs_own_config_result_and_output(tmp_path):
    run = finished_run(tmp_path, settings={"training": {"learning_rate": 3e-5}}, metrics={"eval_loss": 1.25})
    spy = Inspector()
    run_exporter(spy, run, output=tmp_path / "somewhere.bin")
    seen = spy.seen
    assert seen["lr"] == 3e-5 and seen["output_dir"] == str(run)           # config.yaml, not defaults
    assert seen["export_output"] == tmp_path / "somewhere.bin"
    assert seen["metrics"]["eval_loss"] == 1.25 and seen["data_stats"]["records"] == 12
    assert seen["model_dir"] == run / "adapter" and seen["run_dir"] == run
    # the run's plugins and the one passed, nothing else (no defaults, no other installed plugin)
    assert sorted(seen["plugins"]) == ["alpaca", "inspector", "lora"]


def test_export_loads_only_the_runs_plugins_and_the_named_ones(tmp_path):
    import subprocess
    import sys

    run = finished_run(tmp_path, method="lora", plugins=("chatml",))
    code = ("import sys\nfrom ftcore.tools.export import export\n"
            f"print(export({str(run)!r}, {str(tmp_path / 'm')!r}, ['merge'], log=lambda m: None))\n"
            "print(sorted(m for m in sys.modules if m.startswith('ftcore_plugins.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    loaded = eval(out[-1])
    assert "ftcore_plugins.exporters.merged_model" in loaded and "ftcore_plugins.formats.chatml" in loaded
    assert not any(m.startswith(("ftcore_plugins.exporters.gguf", "ftcore_plugins.formats.alpaca",
                                 "ftcore_plugins.strategies", "ftcore_plugins.adapters.qlora")) for m in loaded)
    assert (tmp_path / "m" / "config.json").is_file()   # merge honours --output


def test_export_calls_only_the_named_exporters(tmp_path):
    run = finished_run(tmp_path, plugins=("alpaca", "merge"))
    spy = Inspector()
    written = run_exporter(spy, run)
    assert written == [] and spy.seen and not (run / "merged").exists()   # the run's merge exporter was not rerun


class MergeCounter:
    """Counts calls to ftcore_merge_adapter without answering it (a wrapper makes no kind)."""

    name = "merge-counter"

    def __init__(self) -> None:
        self.calls = 0

    @ftcore.hookimpl(wrapper=True)
    def ftcore_merge_adapter(self, adapter_dir):
        self.calls += 1
        return (yield)


def test_merge_and_gguf_export_in_one_run_merge_once(tiny_model_dir, alpaca_file, tmp_path):
    pytest.importorskip("gguf")
    counter = MergeCounter()
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    config.update(plugins=["lora", "alpaca", "merge", "gguf-export"], **{"gguf-export": {"quant": "f32"}})
    result = ftcore.run(config, plugins=[counter], log=lambda m: None)
    assert counter.calls == 1
    assert (result.output_dir / "merged" / "config.json").is_file()
    gguf_file = next(p for p in result.exports if p.suffix == ".gguf")
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    from safetensors.torch import load_file

    merged = load_file(str(result.output_dir / "merged" / "model.safetensors"))
    v = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    import numpy as np

    expected = merged["model.layers.0.self_attn.v_proj.weight"].numpy()
    assert np.array_equal(np.asarray(v.data).reshape(-1), expected.reshape(-1))   # written from the merged folder


class Failing:
    name = "failing"

    @ftcore.hookimpl
    def ftcore_export(self, run_dir):
        raise ftcore.ConfigError("failing: the destination is full (a user error the exporter reports)")


class Buggy:
    name = "buggy"

    @ftcore.hookimpl
    def ftcore_export(self, run_dir):
        raise RuntimeError("index out of range in buggy's writer (a bug of the exporter's)")


@pytest.mark.parametrize("exporter,error,recorded,status", [
    (Failing, ftcore.ConfigError, "failing: the destination is full (a user error the exporter reports)", 2),
    (Buggy, PluginFailure, 'plugin "buggy" (module test_export) failed in ftcore_export: RuntimeError: index out '
                           "of range in buggy's writer (a bug of the exporter's)", 1),
])
def test_a_failing_exporter_leaves_summary_and_report_that_record_it(tiny_model_dir, alpaca_file, tmp_path,
                                                                     exporter, error, recorded, status):
    """A user error (exit 2) or a bug (exit 1, its type named): either way the trained adapter is kept and the
    summary and report say what failed."""
    out = tmp_path / "out"
    with pytest.raises(error):
        ftcore.run(tiny_config(tiny_model_dir, alpaca_file, out), plugins=[exporter()], log=lambda m: None)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["export_errors"]) == 1 and summary["export_errors"][0].startswith(recorded)
    assert summary["exit_code"] == status and summary["metrics"]["steps"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    report = (out / "report.html").read_text()
    assert 'id="export-errors"' in report and ("destination is full" in report or "buggy&#x27;s writer" in report
                                               or "buggy's writer" in report)


def test_a_failing_exporter_exits_with_its_status_from_the_cli(tmp_path):
    run = finished_run(tmp_path)
    (run / "merged").mkdir()
    (run / "merged" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["export", "--model", str(run), "--plugins", "merge"])
    assert result.exit_code == 2 and "already exists" in result.output and "Traceback" not in result.output
    assert (run / "merged" / "keep.txt").read_text() == "mine"
