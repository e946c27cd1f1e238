"""Strategies: start and shape multi-process runs (DeepSpeed ZeRO)."""
