"""Peak memory of short real runs, measured in a process of their own (used by test_estimate.py).

    python tests/memory_probe.py SPEC.json  ->  one JSON line: {"runs": [{"peak": bytes, ...}, ...]}

SPEC holds ``warmup`` (a run config executed first, unmeasured: lazy imports, thread pools,
one-time caches) and ``runs`` (configs measured one after the other).

CPU: the peak of anonymous resident memory while training, over the anonymous memory just
before the run, plus the frozen tensors of the model that are views into its mapped
safetensors file (never written, they never become anonymous memory). The rest of a mapped model file is page cache, not counted
(the qlora plugin reads its checkpoint instead of mapping it, so there none is mapped). The
kernel's peak is reset when training starts (Linux clear_refs) and a thread samples as well.
The allocator is left as a user has it (no MALLOC_* settings): before each run the memory glibc's
malloc keeps after earlier frees is handed back (malloc_trim), so the baseline holds only live memory
and the run's growth over it is at least its own peak (freed memory malloc keeps during the run is
counted, as the user's machine pays it too).
CUDA: the allocator's peak, reset when training starts.
"""

from __future__ import annotations

import gc
import json
import sys
import threading

import ftcore


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of this process, in bytes."""
    from ftcore.reporting.memory import proc_status

    found = proc_status()
    return {key: found[key] for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")}


def trim() -> None:
    """Collect garbage and give malloc's free memory back to the system (glibc's malloc_trim)."""
    import ctypes
    import ctypes.util

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass                                 # not glibc: the baseline then includes malloc's free memory


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mapped_file_ranges() -> list[tuple[int, int]]:
    """Address ranges of model files (safetensors) mapped into this process."""
    ranges = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    return ranges


def frozen_weights_in_mapped_files(model) -> int:
    """Bytes of the model's frozen tensors that are views into mapped model files.

    Trained ones are views too at first, but the optimizer writes them: copy-on-write moves
    them to anonymous memory, where they are counted already.
    """
    ranges = mapped_file_ranges()
    seen, total = set(), 0
    for t in [*(p for p in model.parameters() if not p.requires_grad), *model.buffers()]:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        if any(start <= ptr < end for start, end in ranges):
            total += storage.nbytes()
    return total


class Probe:
    """An extension plugin whose trainer callback records the peak of one run."""

    name = "memory_probe"

    def __init__(self) -> None:
        self.sampled = 0
        self.stop = threading.Event()
        self.result: dict[str, int | bool | None] = {}

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.sampled = max(self.sampled, status()["RssAnon"])

    @ftcore.hookimpl
    def ftcore_trainer_callbacks(self, ctx):
        from transformers import TrainerCallback

        probe = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                probe.result["mapped_weights"] = frozen_weights_in_mapped_files(kw["model"])
                probe.result["hwm_reset"] = reset_peak()
                probe.file_at_start = status()
                probe.sampled = probe.file_at_start["RssAnon"]
                threading.Thread(target=probe._sample, daemon=True).start()

            def on_train_end(self, args, state, control, **kw):
                import torch

                probe.stop.set()
                now = status()
                not_anon = max(now["RssFile"], probe.file_at_start["RssFile"]) + now.get("RssShmem", 0)
                probe.result["anon_peak_kernel"] = now["VmHWM"] - not_anon if probe.result["hwm_reset"] else None
                probe.result["anon_peak_sampled"] = probe.sampled
                if torch.cuda.is_available():
                    probe.result["cuda_peak"] = torch.cuda.max_memory_allocated()

        return [Callback()]


def measure(config: dict) -> dict:
    probe = Probe()
    trim()
    baseline = status()["RssAnon"]
    ftcore.run(config, plugins=[probe], log=lambda m: None)
    r = probe.result
    peak = max(r["anon_peak_kernel"] or 0, r["anon_peak_sampled"]) - baseline + r["mapped_weights"]
    out = {"device": "cpu", "peak": peak, "baseline": baseline, "hwm_reset": r["hwm_reset"],
           "mapped_weights": r["mapped_weights"],
           "sampled": r["anon_peak_sampled"] - baseline}
    if r.get("cuda_peak") is not None:
        out.update(device="cuda", peak=r["cuda_peak"])
    return out


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    if spec.get("warmup"):
        ftcore.run(spec["warmup"], log=lambda m: None)
    print(json.dumps({"runs": [measure(c) for c in spec["runs"]]}))


if __name__ == "__main__":
    main(sys.argv[1])
