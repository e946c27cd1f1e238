"""Objective plugins: what training optimises (sft, the default; dpo and kto through TRL's trainers)."""
