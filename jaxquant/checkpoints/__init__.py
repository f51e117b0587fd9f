"""Checkpoint readers (Hugging Face, GGUF), conversion, and jaxquant (Orbax) checkpoints."""
