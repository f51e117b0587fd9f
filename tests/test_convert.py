"""Conversion round trips: HF directory / GGUF -> jaxquant checkpoint -> identical logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxquant
from jaxquant.cli.main import main
from jaxquant.models import transformer
from jaxquant.params import flatten
from tests.conftest import WIKI_TEST
from tests.hf_models import make_model

_forward = jax.jit(transformer.forward, static_argnums=1)


def assert_same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_hf_dir_matches_transformers(tiny_hf_dir):
    model = jaxquant.load_model(tiny_hf_dir)
    assert model.source_format == "safetensors" and model.config.family == "llama"
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 11))
    torch_model = make_model("llama", seed=7)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(tokens)).logits.numpy()
    got = np.asarray(_forward(model.params, model.config, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_hf_dir_convert_round_trip(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["convert", "--model", str(tiny_hf_dir), "--out", str(out)]) == 0
    src = jaxquant.load_model(tiny_hf_dir)
    back = jaxquant.load_model(out)
    assert back.source_format == "jaxquant" and back.config == src.config
    assert_same_params(src.params, back.params)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, src.config.vocab_size, (1, 9)))
    np.testing.assert_array_equal(np.asarray(_forward(src.params, src.config, tokens)),
                                  np.asarray(_forward(back.params, back.config, tokens)))
    info_code = main(["info", str(out)])
    assert info_code == 0 and "jaxquant" in capsys.readouterr().out


def test_bf16_convert(tiny_hf_dir, tmp_path):
    out = tmp_path / "bf16"
    assert main(["convert", "--model", str(tiny_hf_dir), "--out", str(out),
                 "--dtype", "bfloat16"]) == 0
    back = jaxquant.load_model(out, dtype="bfloat16")
    leaves = jax.tree.leaves(back.params)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_every_family_saves_and_loads(family, tmp_path):
    torch_model = make_model(family, seed=11)
    torch_model.save_pretrained(tmp_path / "hf")
    src = jaxquant.load_model(tmp_path / "hf")
    jaxquant.save_checkpoint(tmp_path / "ck", config=src.config, params=src.params)
    back = jaxquant.load_model(tmp_path / "ck")
    assert back.config == src.config
    assert_same_params(src.params, back.params)
    tokens = np.random.default_rng(2).integers(0, src.config.vocab_size, (1, 10))
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(_forward(back.params, back.config,
                                                   jnp.asarray(tokens))), ref, atol=1e-4)


@pytest.mark.model
def test_smollm2_gguf_convert_round_trip(smollm2_model, tmp_path):
    src = smollm2_model  # jaxquant.load_model("smollm2-135m")
    cfg = src.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    out = tmp_path / "smollm2"
    jaxquant.save_checkpoint(out, config=cfg, params=src.params, tokenizer=src.tokenizer)
    back = jaxquant.load_model(out)
    assert back.config == cfg
    assert_same_params(src.params, back.params)
    text = "The capital of France is Paris. It is known for"
    ids = jaxquant.tokenize(back.tokenizer, text)
    assert ids.tolist() == jaxquant.tokenize(src.tokenizer, text).tolist()
    # The logits on real text (the shape test_smollm2's parity check compiles too).
    wiki = jaxquant.tokenize(src.tokenizer, jaxquant.load_text(WIKI_TEST, "wikitext")[:2000])
    tokens = jnp.asarray(wiki[:160][None])
    a = _forward(src.params, cfg, tokens)
    b = _forward(back.params, back.config, tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
