"""The embedded SmolLM2-135M: logits parity with transformers on the real weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxquant
from jaxquant.models import transformer
from tests.conftest import WIKI_TEST


@pytest.mark.model
def test_smollm2_logits_match_transformers(smollm2_model, smollm2_transformers):
    # transformers' LlamaForCausalLM on transformers' own reading of the GGUF tensors.
    ref_model, missing = smollm2_transformers.model
    assert set(missing) <= {"lm_head.weight"}  # tied to the embeddings

    model = smollm2_model  # jaxquant.load_model("smollm2-135m")
    text = jaxquant.load_text(WIKI_TEST, "wikitext")[:2000]
    ids = jaxquant.tokenize(model.tokenizer, text)[:160][None]
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    got = np.asarray(jax.jit(transformer.forward, static_argnums=1)(
        model.params, model.config, jnp.asarray(ids)))
    assert np.isfinite(got).all() and np.abs(ref).max() > 5
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    # Same next-token predictions everywhere.
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99


@pytest.mark.slow
def test_smollm2_wikitext_ppl_first_10_windows(smollm2_model):
    """Acceptance: transformers gives PPL 20.296 on the first 10 windows (MISSION.md)."""
    model = smollm2_model
    ids = jaxquant.tokenize(model.tokenizer, jaxquant.load_text(WIKI_TEST, "wikitext"))
    assert len(ids) // 2048 == 147
    windows = jaxquant.make_windows(ids, 2048, max_windows=10)
    result = jaxquant.evaluate_perplexity(model.params, model.config, windows, progress=False)
    assert abs(result.ppl - 20.296) <= 0.01, result.ppl
