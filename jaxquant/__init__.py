"""jaxquant: post-training quantization of large language models in JAX/Pallas.

The public API::

    model = jaxquant.load_model("smollm2-135m")          # or HF dir / .gguf / checkpoint
    logits = jaxquant.forward(model.params, model.config, tokens)
    result = jaxquant.evaluate_perplexity(model.params, model.config, windows)
    qparams = jaxquant.quantize(model.params, jaxquant.Recipe.uniform(
        jaxquant.QuantSpec(bits=4, group_size=128)))
    jaxquant.save_checkpoint("out", config=model.config, params=qparams,
                             tokenizer=model.tokenizer)
    # activation quantization: a transform, then quantized activations in the forward
    params, cfg, info = jaxquant.apply_transform(
        model.params, model.config, jaxquant.TransformConfig(kind="smoothrot"), windows)
    cfg = dataclasses.replace(cfg, act_quant=jaxquant.ActQuantConfig(bits=4, clip_ratio=0.9))
    # sharded: 4-way data x 2-way tensor parallel (docs/sharding.md)
    mesh = jaxquant.make_mesh(jaxquant.MeshConfig(data=4, model=2))
    result = jaxquant.evaluate_perplexity(qparams, model.config, windows, mesh=mesh)
"""

from jaxquant.algorithms.act_quant import ActQuantConfig
from jaxquant.checkpoints.jq_checkpoint import load_checkpoint, save_checkpoint
from jaxquant.checkpoints.load import Model, load_model
from jaxquant.data import load_text, make_windows, sample_windows, tokenize
from jaxquant.errors import CheckpointError, ConfigError, DataError, JaxquantError, MeshError
from jaxquant.eval import PerplexityResult, evaluate_perplexity
from jaxquant.formats import (
    CodebookWeight,
    MixedWeight,
    OutlierWeight,
    QuantizedWeight,
    UniformWeight,
)
from jaxquant.generate import greedy_generate
from jaxquant.models import (
    CausalLM,
    ModelConfig,
    decode_step,
    forward,
    from_hf_config,
    init_cache,
    init_params,
)
from jaxquant.ops import linear, register_linear
from jaxquant.quantize import quantization_report, quantize
from jaxquant.recipes import QuantSpec, Recipe, RecipeError, Rule
from jaxquant.sharding import MeshConfig, make_mesh, shard_params
from jaxquant.transforms.pipeline import TransformConfig, apply_transform

__version__ = "0.1.0"

__all__ = [
    "ActQuantConfig",
    "CausalLM",
    "CheckpointError",
    "CodebookWeight",
    "ConfigError",
    "DataError",
    "JaxquantError",
    "MeshConfig",
    "MeshError",
    "MixedWeight",
    "Model",
    "ModelConfig",
    "OutlierWeight",
    "PerplexityResult",
    "QuantSpec",
    "QuantizedWeight",
    "Recipe",
    "RecipeError",
    "Rule",
    "TransformConfig",
    "UniformWeight",
    "apply_transform",
    "decode_step",
    "evaluate_perplexity",
    "forward",
    "from_hf_config",
    "greedy_generate",
    "init_cache",
    "init_params",
    "linear",
    "load_checkpoint",
    "load_model",
    "load_text",
    "make_mesh",
    "make_windows",
    "quantization_report",
    "quantize",
    "register_linear",
    "sample_windows",
    "save_checkpoint",
    "shard_params",
    "tokenize",
]
