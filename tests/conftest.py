"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

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
