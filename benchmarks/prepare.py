"""Data preparation against the tokenizer's own batch encoding, and its peak memory at a million records.

    python benchmarks/prepare.py              # 100,000 records x 3 interleaved rounds, then 1,000,000 once (~15 min)
    python benchmarks/prepare.py --quick      # 20,000 records, one round, no million

What is compared, each in its own process, on the same alpaca records (benchmarks/make_data.py: long-tailed
made-up text) and the same byte-level BPE tokenizer (16,384 tokens, trained on the data as the tests do):

- ``tokenizer``: the floor. The texts ftcore tokenizes (each record rendered by the alpaca format, outside the
  timing) encoded with the tokenizer's own batch call, ``tokenizer(texts, return_offsets_mapping=True)``, in
  batches of 1,024: what any data path has to do at least. The tokenizers backend called directly
  (``backend_tokenizer.encode_batch``, no Python lists made) is timed too and reported next to it.
- ``prepare``: ``ftcore prepare`` as a user runs it (``--set data.cache=false``, the audit on, as by default):
  reading the JSONL, validation, the format plugin, tokenizing with exact masks, the audit (duplicates, near
  duplicates, leakage, lengths), the split, and the datasets it hands to training. Its rate is records over
  the time of ``prepare_data`` (what the command calls: resolving the config and loading the tokenizer are
  in it, so the rate is if anything low). The libraries are imported before the clock starts (transformers,
  which imports torch, and datasets: about 3 s here), as the floor's are: a rate is per record, and an
  import is paid once a process, not per record. The process's wall time, with Python's start and every
  import, is reported next to it.

Rounds are interleaved (tokenizer, prepare, tokenizer, ...) so that a busy spell of the shared machine hits both;
tables give the median and range. Peak memory is each process's own VmHWM. The million-record run checks that
memory does not grow with the file: the prepared tokens live in Arrow files on disk, not in Python lists.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_data  # noqa: E402  (benchmarks/ is not a package)
from run import commit, versions  # noqa: E402

BATCH = 1024
TARGET_RATIO = 0.75
TARGET_MILLION_MIB = 4096


def peak_mib() -> float:
    from ftcore.reporting.memory import proc_status

    return round(proc_status()["VmHWM"] / 2**20, 1)


def tokenizer_folder(work: Path) -> Path:
    """A model folder without weights (``ftcore prepare`` loads only the tokenizer): a byte-level BPE tokenizer
    of 16,384 tokens trained on the benchmark's training text, and a Llama config."""
    folder = work / "model-v16384"
    if (folder / "config.json").exists():
        return folder
    from transformers import LlamaConfig

    from ftcore.testing import build_tokenizer

    texts = [" ".join(json.loads(line).values()) for line in (work / "train.jsonl").read_text().splitlines()]
    tok = build_tokenizer(texts, vocab_size=16384)
    tok.save_pretrained(str(folder))
    LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(str(folder))
    return folder


def data_file(work: Path, records: int) -> Path:
    """``records`` alpaca records: the generator's 100,000 repeated with their words shuffled where more are
    asked for (so that a million are not a million exact duplicates, which the audit would report as such)."""
    paths = make_data.generate(work)
    if records <= 100_000:
        out = work / f"prep-{records}.jsonl"
        if not out.exists():
            lines = paths["prep"].read_text(encoding="utf-8").splitlines()[:records]
            out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return out
    out = work / f"prep-{records}.jsonl"
    if out.exists():
        return out
    import random

    rng = random.Random(records)
    base = paths["prep"].read_text(encoding="utf-8").splitlines()
    with open(out, "w", encoding="utf-8") as fh:
        for n in range(records):
            r = json.loads(base[n % len(base)])
            if n >= len(base):
                words = r["output"].split(" ")
                rng.shuffle(words)
                r["output"] = " ".join(words)
            fh.write(json.dumps(r) + "\n")
    return out


# -- workers (each in its own process) ----------------------------------------------------

def worker_tokenizer(spec: dict[str, Any]) -> dict[str, Any]:
    """The floor: the rendered texts batch-encoded with offsets, by transformers' call and by the backend."""
    from transformers import AutoTokenizer

    from ftcore.testing import format_config
    from ftcore_plugins.formats import alpaca

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    config = format_config()
    texts: list[str] = []
    with open(spec["data"], encoding="utf-8") as fh:
        for line in fh:
            ex = alpaca.ftcore_format_record(record=json.loads(line), tokenizer=tokenizer, config=config)
            texts.append(ex.text)
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), BATCH):
        enc = tokenizer(texts[i:i + BATCH], return_offsets_mapping=True)
        tokens += sum(len(ids) for ids in enc["input_ids"])
    call_s = time.perf_counter() - t0
    backend = tokenizer.backend_tokenizer
    t0 = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        for e in backend.encode_batch(texts[i:i + BATCH]):
            e.offsets   # noqa: B018 - the offsets, as the call above returns them
    backend_s = time.perf_counter() - t0
    return {"records": len(texts), "tokens": tokens, "seconds": round(call_s, 3),
            "records_per_s": round(len(texts) / call_s, 1), "backend_seconds": round(backend_s, 3),
            "backend_records_per_s": round(len(texts) / backend_s, 1), "peak_rss_mib": peak_mib()}


def worker_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """``ftcore prepare`` with the cache off, as the CLI runs it (the data path timed inside, the process
    from outside)."""
    import datasets  # noqa: F401 - imported before the clock, as the floor's transformers is (see above)
    from transformers import AutoTokenizer  # noqa: F401 - as the floor does (it imports torch)

    from ftcore.tools.prepare import prepare_data

    lines: list[str] = []
    t0 = time.perf_counter()
    report = prepare_data(flags={"model": spec["tokenizer"], "data": {"datasets": [spec["data"]], "cache": False},
                                 "output_dir": spec["out"]}, log=lines.append)
    seconds = time.perf_counter() - t0
    s = report.stats
    return {"records": s.records, "examples": s.examples, "tokens": s.tokens, "seconds": round(seconds, 3),
            "records_per_s": round(s.records / seconds, 1), "peak_rss_mib": peak_mib(),
            "audit_checked": bool(s.audit), "exact_duplicates": s.audit.get("counts", {}).get("exact_duplicates")}


def worker_main(name: str, spec_path: str, result_path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = json.loads(Path(spec_path).read_text())
    result = worker_tokenizer(spec) if name == "tokenizer" else worker_prepare(spec)
    Path(result_path).write_text(json.dumps(result, indent=2))


def run_worker(name: str, spec: dict[str, Any], work: Path, tag: str) -> dict[str, Any]:
    spec_path, result_path = work / f"spec-{name}-{tag}.json", work / f"result-{name}-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    print(f"[prepare-bench] {name} {tag} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", name, str(spec_path), str(result_path)],
                          capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="true"))
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.exists():
        print(proc.stdout[-2000:] + proc.stderr[-4000:], flush=True)
        raise SystemExit(f"[prepare-bench] {name} {tag} failed (exit {proc.returncode})")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = round(wall, 2)
    result["load_avg_start"] = round(os.getloadavg()[0], 2)
    print(f"[prepare-bench] {name} {tag}: {result['records_per_s']} records/s, peak {result['peak_rss_mib']} MiB",
          flush=True)
    return result


def stat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown(report: dict[str, Any]) -> str:
    def rng(s: dict[str, float], fmt: str = ",.0f") -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    t, p = report["tokenizer"], report["prepare"]
    lines = [
        f"Measured by `{report['command']}` at {report['finished']}, commit {report['commit']['sha'][:12]}"
        f"{' (with uncommitted changes)' if report['commit']['dirty'] else ''}, {report['machine']}: "
        f"{report['records']:,} alpaca records, byte-level BPE tokenizer of 16,384 tokens, cold (cache off, "
        f"audit on), median (range) of {report['rounds']} interleaved rounds.", "",
        "| | records/s | peak RSS MiB |", "|---|---:|---:|",
        f"| tokenizer's batch encoding with offsets (`tokenizer(texts, return_offsets_mapping=True)`) | "
        f"{rng(t['records_per_s'])} | {rng(t['peak_rss_mib'])} |",
        f"| the tokenizers backend directly (`encode_batch`) | {rng(t['backend_records_per_s'])} | |",
        f"| `ftcore prepare` (read, validate, format, tokenize with masks, audit, split) | "
        f"{rng(p['records_per_s'])} | {rng(p['peak_rss_mib'])} |", "",
        f"prepare / the tokenizer's batch encoding: **{report['ratio']:.2f}x** (target >= {TARGET_RATIO}x: "
        f"{'met' if report['ratio'] >= TARGET_RATIO else 'MISSED'}); against the backend called directly: "
        f"{report['ratio_backend']:.2f}x. Wall time of the whole `ftcore prepare` process (Python's start and "
        f"imports included): {rng(p['process_wall_s'], '.1f')} s."]
    if "million" in report:
        m = report["million"]
        lines += ["", f"1,000,000 records: peak RSS **{m['peak_rss_mib']:,.0f} MiB** (target <= "
                  f"{TARGET_MILLION_MIB} MiB: {'met' if m['peak_rss_mib'] <= TARGET_MILLION_MIB else 'MISSED'}), "
                  f"{m['records_per_s']:,.0f} records/s, {m['tokens']:,} tokens, {m['process_wall_s']:.0f} s wall."]
    return "\n".join(lines) + "\n"


SECTION = "## Data preparation"


def record_in_results(text: str, path: Path) -> None:
    """Put the section into RESULTS.md (replacing an earlier one), where the training benchmark keeps it."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    head, _, rest = old.partition(SECTION)
    tail = ""
    if rest:
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
    path.write_text(head.rstrip("\n") + f"\n\n{SECTION}\n\n" + text + ("\n" + tail if tail else ""), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 records, one round, no million-record run")
    ap.add_argument("--records", type=int, help="records in the speed comparison (default 100,000)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    ap.add_argument("--million", type=int, default=1_000_000, help="records of the memory check (0: skip)")
    ap.add_argument("--work", default=str(HERE / ".work" / "prepare"))
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(*args.worker)
        return
    records = args.records or (20_000 if args.quick else 100_000)
    rounds = args.rounds or (1 if args.quick else 3)
    million = 0 if args.quick else args.million
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = data_file(work, records)
    spec = {"tokenizer": str(tokenizer_folder(work)), "data": str(data), "out": str(work / "run")}
    runs: dict[str, list[dict[str, Any]]] = {"tokenizer": [], "prepare": []}
    for i in range(rounds):
        for name in runs:
            runs[name].append(run_worker(name, spec, work, tag=f"{records}-{i + 1}"))
    report: dict[str, Any] = {
        "command": "python benchmarks/prepare.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "machine": f"{os.uname().machine} Linux, {os.cpu_count()} CPU cores", "commit": commit(),
        "versions": versions() | {"tokenizers": __import__("importlib.metadata").metadata.version("tokenizers")},
        "records": records, "rounds": rounds, "runs": runs,
        "tokenizer": {k: stat([r[k] for r in runs["tokenizer"]])
                      for k in ("records_per_s", "backend_records_per_s", "peak_rss_mib")},
        "prepare": {k: stat([r[k] for r in runs["prepare"]]) for k in ("records_per_s", "peak_rss_mib",
                                                                       "process_wall_s")},
    }
    report["ratio"] = round(report["prepare"]["records_per_s"]["median"]
                            / report["tokenizer"]["records_per_s"]["median"], 3)
    report["ratio_backend"] = round(report["prepare"]["records_per_s"]["median"]
                                    / report["tokenizer"]["backend_records_per_s"]["median"], 3)
    if million:
        report["million"] = run_worker("prepare", {**spec, "data": str(data_file(work, million))}, work,
                                       tag=f"{million}")
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = markdown(report)
    json_path = work / "results-prepare-quick.json" if args.quick else HERE / "results-prepare.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if not args.quick:
        record_in_results(text, HERE / "RESULTS.md")
    print(text)


if __name__ == "__main__":
    main()
