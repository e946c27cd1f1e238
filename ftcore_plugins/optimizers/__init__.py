"""Optimizers: build the optimizer over the trainable parameters."""
