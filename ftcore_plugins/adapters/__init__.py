"""Adapter methods: load the base model and wrap it for training (LoRA, QLoRA, full fine-tuning)."""
