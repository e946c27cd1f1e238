"""A throw-away extension plugin for tests: keeps the trained model and the logits it gives at the end."""

from __future__ import annotations

from typing import Any

import ftcore


def probe_ids(vocab_size: int, length: int = 24) -> Any:
    """A fixed input to compare logits on (same ids every call)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab_size, (2, length), generator=g)


class Capture:
    """Records the model ftcore trained and its logits on ``probe_ids`` once training has finished."""

    name = "capture"

    def __init__(self) -> None:
        self.model = None
        self.logits = None
        self.log: list[str] = []
        self.trainer = None

    @ftcore.hookimpl
    def ftcore_model_loaded(self, model):
        self.model = model

    @ftcore.hookimpl
    def ftcore_trainer_created(self, trainer):
        self.trainer = trainer

    @ftcore.hookimpl
    def ftcore_run_finished(self, result, ctx):
        import torch

        self.model.eval()
        vocab = len(ctx.tokenizer)
        with torch.no_grad():
            self.logits = self.model(input_ids=probe_ids(vocab)).logits.float()
