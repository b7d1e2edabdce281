"""Hugging Face safetensors checkpoints ↔ moetrain checkpoints."""
