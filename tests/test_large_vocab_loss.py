"""benchmarks/large_vocab_loss.py through its smoke path: every configuration in its own process, the plain and
chunked losses side by side on a small and a larger vocabulary, the paired in-process speed comparison, the JSON and
markdown it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_large_vocabulary_benchmark_runs_both_losses_and_writes_its_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "large_vocab_loss.py"), "--smoke",
                           "--work", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results-loss.json").read_text())
    runs = report["runs"]
    assert sorted((r["loss"], r["vocab"]) for r in runs) == [("chunked", 512), ("chunked", 8192),
                                                              ("plain", 512), ("plain", 8192)]
    for run in runs:
        assert run["loss_path"] == ("chunked" if run["loss"] == "chunked" else "sparse")   # what the run recorded
        assert run["peak_rss_mib"] > 0 and run["tokens_per_s"] > 0 and run["tokens"] > 0
    by = {(r["loss"], r["vocab"]): r for r in runs}
    for vocab in (512, 8192):   # the same model, data and steps: the same losses
        assert by["chunked", vocab]["train_loss"] == pytest.approx(by["plain", vocab]["train_loss"], rel=1e-4)
    summary = report["summary"]
    assert set(summary["extra_peak_mib"]) == {"plain", "chunked"} and summary["extra_weights_mib"] > 0
    for vocab in ("512", "8192"):   # the paired speed run: both losses on one model, equal losses, ratios measured
        paired = report["paired"][vocab]
        assert len(paired["pairs"]) == 2 and all(p["plain_s"] > 0 and p["chunked_s"] > 0 for p in paired["pairs"])
        assert paired["max_loss_difference"] < 1e-4
        assert summary["chunked_over_plain_paired"][vocab] == paired["ratio_median"] > 0
    text = (tmp_path / "out" / "RESULTS-loss.md").read_text()
    assert "| chunked | 8,192 |" in text and "| plain | 512 |" in text and "Extra peak" in text
    assert "paired in one process" in text
