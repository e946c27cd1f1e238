"""Test-only plugins for tests/test_deepspeed*.py and test_fsdp_ranks.py, installed the way a third party's are.

This folder holds a minimal ``*.dist-info`` with entry points; putting the folder on
PYTHONPATH (or sys.path) makes ``importlib.metadata`` find these plugins, in the test
process and in every launched rank alike.
"""

from __future__ import annotations

import atexit
import json
import os

import ftcore


class FailingRank:
    """Raise in the rank FTCORE_TEST_FAIL_RANK once it has finished step FTCORE_TEST_FAIL_STEP; with
    FTCORE_TEST_FAIL_SIGNAL (KILL, TERM), that rank sends itself the signal at that step instead."""

    @ftcore.hookimpl
    def ftcore_trainer_callbacks(self, ctx):
        from transformers import TrainerCallback

        rank, step = os.environ.get("FTCORE_TEST_FAIL_RANK"), int(os.environ.get("FTCORE_TEST_FAIL_STEP", "1"))

        class FailAtStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if os.environ.get("RANK") != rank or state.global_step < step:
                    return
                sig = os.environ.get("FTCORE_TEST_FAIL_SIGNAL")
                if sig:
                    if state.global_step == step:
                        import signal

                        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
                else:
                    raise RuntimeError(f"injected failure on rank {rank} at step {state.global_step}")

        return [FailAtStep()]


class ProbeExport:
    """Record each rank's share of the loaded weights and, as the rank exits, whether it still belongs to a
    process group and shows its stacks on a fatal signal (to FTCORE_TEST_PROBE_DIR); as an exporter, load
    the saved model with plain transformers and record which rank did it and the shapes."""

    @ftcore.hookimpl
    def ftcore_model_loaded(self, model):
        folder = os.environ.get("FTCORE_TEST_PROBE_DIR")
        if folder:
            atexit.register(record_exit, os.path.join(folder, f"exit-rank{os.environ.get('RANK')}.json"))
            local = sum(p.numel() for p in model.parameters())
            full = sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())
            path = os.path.join(folder, f"loaded-rank{os.environ.get('RANK')}.json")
            with open(path, "w") as fh:
                json.dump({"local": local, "full": full}, fh)

    @ftcore.hookimpl
    def ftcore_export(self, run_dir, model_dir):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
        target = run_dir / "probe-export.json"
        target.write_text(json.dumps({
            "rank": os.environ.get("RANK"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "shapes": {n: list(p.shape) for n, p in model.named_parameters()},
        }))
        return [target]


def record_exit(path):
    import faulthandler

    import torch.distributed as dist

    with open(path, "w") as fh:
        json.dump({"in_process_group": dist.is_initialized(), "faulthandler": faulthandler.is_enabled()}, fh)


class Sgd:
    """Plain SGD built by a plugin (a client optimizer)."""

    @ftcore.hookimpl
    def ftcore_build_optimizer(self, model, training_args):
        import torch

        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=training_args.learning_rate)


class FourBit:
    """Declares 4-bit base weights (its memory profile); never loads (it must be refused before launch)."""

    @ftcore.hookimpl
    def ftcore_load_model(self, model_path, tokenizer, config, ctx):
        raise AssertionError("a quantized adapter with ZeRO-3 must be refused before any model is loaded")

    @ftcore.hookimpl
    def ftcore_memory_profile(self, config, ctx):
        return ftcore.MemoryProfile(trains="adapters", base_storage="4bit", adapter_rank=8,
                                    adapter_targets=("q_proj",), assumptions="a stand-in 4-bit adapter method.")


class ProbeOptimizer:
    """Record each rank's optimizer as the classes wrapped one in another (to FTCORE_TEST_PROBE_DIR).

    It also adjusts the training arguments (as a tracker would): an extension, which runs beside a strategy.
    """

    @ftcore.hookimpl(trylast=True)   # after the strategy's: it sees the arguments as the trainer will
    def ftcore_training_arguments(self, args, ctx):
        folder = os.environ.get("FTCORE_TEST_PROBE_DIR")
        if folder:
            with open(os.path.join(folder, f"arguments-rank{ctx.rank}.json"), "w") as fh:
                json.dump({"has_deepspeed": "deepspeed" in args, "world_size": ctx.world_size}, fh)

    @ftcore.hookimpl
    def ftcore_trainer_callbacks(self, ctx):
        from transformers import TrainerCallback

        class Record(TrainerCallback):
            def on_step_end(self, args, state, control, optimizer=None, **kwargs):
                folder = os.environ.get("FTCORE_TEST_PROBE_DIR")
                if folder and state.global_step == 1:
                    chain, inner = [], optimizer
                    while inner is not None and len(chain) < 6:
                        chain.append(type(inner).__name__)
                        inner = getattr(inner, "optimizer", None)
                    with open(os.path.join(folder, f"optimizer-rank{os.environ.get('RANK')}.json"), "w") as fh:
                        json.dump(chain, fh)

        return [Record()]


class RankMemory:
    """Each rank's peak memory while training, over its memory before (to FTCORE_TEST_PROBE_DIR/memory-rankN.json):
    the peak of anonymous resident memory during training (sampled, and the kernel's peak reset as training
    starts), less the anonymous memory once the model was loaded minus the model's own tensors there (they are
    freed as FSDP shards them), plus frozen tensors still mapped from the model file (as tests/memory_probe.py)."""

    @ftcore.hookimpl
    def ftcore_model_loaded(self, model):
        import threading

        from memory_probe import frozen_weights_in_mapped_files, mapped_file_ranges, status, trim

        folder = os.environ.get("FTCORE_TEST_PROBE_DIR")
        if not folder:
            return
        trim()
        ranges = mapped_file_ranges()
        seen, anon_model = set(), 0
        for t in [*model.parameters(), *model.buffers()]:
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            if not any(start <= storage.data_ptr() < end for start, end in ranges):
                anon_model += storage.nbytes()
        self.baseline = status()["RssAnon"] - anon_model
        self.folder, self.sampled, self.stop = folder, 0, threading.Event()

        def frozen_mapped(net):   # FSDP's shards are DTensors: their local part is what this rank holds
            local = type("Local", (), {})()
            params = [p.to_local() if type(p).__name__ == "DTensor" else p for p in net.parameters()]
            local.parameters, local.buffers = (lambda: iter(params)), net.buffers
            return frozen_weights_in_mapped_files(local)

        self.frozen_mapped = frozen_mapped

    @ftcore.hookimpl
    def ftcore_trainer_callbacks(self, ctx):
        import threading

        from memory_probe import reset_peak, status
        from transformers import TrainerCallback

        probe = self
        if not getattr(self, "folder", None):
            return []

        def sample():
            while not probe.stop.wait(0.002):
                probe.sampled = max(probe.sampled, status()["RssAnon"])

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                probe.mapped = probe.frozen_mapped(kw["model"])
                probe.reset = reset_peak()
                probe.start = status()
                probe.sampled = probe.start["RssAnon"]
                threading.Thread(target=sample, daemon=True).start()

            def on_train_end(self, args, state, control, **kw):
                probe.stop.set()
                now = status()
                not_anon = max(now["RssFile"], probe.start["RssFile"]) + now.get("RssShmem", 0)
                kernel = now["VmHWM"] - not_anon if probe.reset else 0
                peak = max(kernel, probe.sampled) - probe.baseline + probe.mapped
                with open(os.path.join(probe.folder, f"memory-rank{os.environ.get('RANK')}.json"), "w") as fh:
                    json.dump({"peak": peak, "baseline": probe.baseline, "mapped": probe.mapped,
                               "at_train_begin": probe.start["RssAnon"] - probe.baseline + probe.mapped}, fh)

        return [Callback()]


fail = FailingRank()
probe_export = ProbeExport()
sgd = Sgd()
four_bit = FourBit()
probe_optimizer = ProbeOptimizer()
rank_memory = RankMemory()
