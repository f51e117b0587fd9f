"""Decoder-only model families (Flax NNX) and their configs."""

from jaxquant.models.config import FAMILIES, ModelConfig, RopeConfig, from_hf_config
from jaxquant.models.transformer import (
    CausalLM,
    abstract_params,
    bind,
    decode_step,
    forward,
    hidden_states,
    init_cache,
    init_params,
)

__all__ = [
    "FAMILIES",
    "CausalLM",
    "ModelConfig",
    "RopeConfig",
    "abstract_params",
    "bind",
    "decode_step",
    "forward",
    "from_hf_config",
    "hidden_states",
    "init_cache",
    "init_params",
]
