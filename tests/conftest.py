"""Shared fixtures."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
WIKI_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved by transformers (safetensors + config.json)."""
    from tests.hf_models import make_model

    model = make_model("llama", seed=7)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_model() -> Any:
    """The embedded SmolLM2-135M as ``jaxquant.load_model`` reads it (GGUF parse and
    dequantization take ~10 s: done once for every test that only reads the model)."""
    import jaxquant

    return jaxquant.load_model("smollm2-135m")


class Smollm2Reference:
    """transformers' own reading of the embedded SmolLM2 GGUF, each part built once.

    transformers parses the whole GGUF file (49k tokenizer strings) in every call that
    touches it (config, tensors, tokenizer: ~9 s each) and rebuilds gguf's tensor name
    map for each of the model's ~400 submodules (~9 s). Both are pure functions of a
    read-only file, so while transformers reads it here the file is parsed once and the
    name map built once per architecture; transformers' own conversion code runs as is.
    """

    def __init__(self) -> None:
        from jaxquant.checkpoints.load import embedded_path

        self.path = embedded_path("smollm2-135m")
        self._readers: dict[Any, Any] = {}

    @contextlib.contextmanager
    def _transformers_reading(self):
        import gguf

        real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map

        def reader(path, *args, **kwargs):
            key = (str(path), args, tuple(sorted(kwargs.items())))
            if key not in self._readers:
                self._readers[key] = real_reader(path, *args, **kwargs)
            return self._readers[key]

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setattr(gguf, "GGUFReader", reader)
            mp.setattr(gguf, "get_tensor_name_map", functools.cache(real_map))
            yield

    @functools.cached_property
    def config(self) -> Any:
        import transformers

        with self._transformers_reading():
            return transformers.AutoConfig.from_pretrained(str(self.path.parent),
                                                           gguf_file=self.path.name)

    @functools.cached_property
    def tensors(self) -> dict[str, Any]:
        """``load_gguf_checkpoint``'s tensors (it undoes the Q/K permutation itself; the
        meta model only supplies the parameter names)."""
        import torch
        import transformers
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with torch.device("meta"):
            meta = transformers.AutoModelForCausalLM.from_config(self.config)
        with self._transformers_reading():
            return load_gguf_checkpoint(str(self.path), return_tensors=True,
                                        model_to_load=meta)["tensors"]

    @functools.cached_property
    def tokenizer(self) -> Any:
        import transformers

        with self._transformers_reading():
            return transformers.AutoTokenizer.from_pretrained(str(self.path.parent),
                                                              gguf_file=self.path.name)

    @functools.cached_property
    def model(self) -> tuple[Any, list[str]]:
        """A float32 eager-attention ``LlamaForCausalLM`` holding :attr:`tensors` (no
        random init first: every parameter is loaded or tied) and its missing keys."""
        import copy

        import transformers
        from transformers.initialization import no_init_weights

        config = copy.deepcopy(self.config)
        config._attn_implementation = "eager"
        with no_init_weights():
            model = transformers.LlamaForCausalLM(config).float().eval()
        missing, _ = model.load_state_dict({k: v.float() for k, v in self.tensors.items()},
                                           strict=False)
        model.tie_weights()
        return model, missing


@pytest.fixture(scope="session")
def smollm2_transformers() -> Smollm2Reference:
    """transformers' config, tensors, tokenizer and model of the embedded SmolLM2."""
    return Smollm2Reference()
