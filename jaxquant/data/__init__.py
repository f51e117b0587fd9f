"""Text corpora: reading, the evaluation protocol's text preparation, windows."""

from jaxquant.data.text import (
    DEMO_CORPORA,
    DEMO_CORPUS,
    demo_corpus_text,
    load_text,
    make_windows,
    sample_windows,
    tokenize,
)

__all__ = [
    "DEMO_CORPORA",
    "DEMO_CORPUS",
    "demo_corpus_text",
    "load_text",
    "make_windows",
    "sample_windows",
    "tokenize",
]
