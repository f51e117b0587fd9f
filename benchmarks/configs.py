"""Model configs the benchmarks share (random weights are built from these)."""

from __future__ import annotations

from jaxquant.models.config import ModelConfig


def llama2_7b(layers: int = 32) -> ModelConfig:
    """The Llama-2-7B architecture (hidden 4096, FFN 11008, 32 heads of 128, vocab 32000)
    with ``layers`` blocks."""
    return ModelConfig(family="llama", vocab_size=32000, hidden_size=4096,
                       intermediate_size=11008, num_layers=layers, num_heads=32,
                       num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5)


def tiny_llama(layers: int = 2) -> ModelConfig:
    """A small Llama for CPU smoke runs (hidden 256, FFN 512, 4 heads of 64, vocab 512);
    its linears split over 2 and 4 devices at whole packing words."""
    return ModelConfig(family="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                       num_layers=layers, num_heads=4, num_kv_heads=4, head_dim=64,
                       rms_norm_eps=1e-5)
