"""Exporters: turn a finished run into an artifact (a merged model, a GGUF file)."""
