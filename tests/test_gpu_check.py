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
