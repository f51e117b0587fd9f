"""Perplexity evaluation and text preparation."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.checkpoints.convert import params_from_source
from jaxquant.cli.main import main
from jaxquant.data import load_text, make_windows, sample_windows
from jaxquant.errors import DataError
from jaxquant.eval import evaluate_perplexity, window_nll
from jaxquant.models import transformer
from jaxquant.params import flatten
from tests.hf_models import make_model, torch_source


@pytest.fixture(scope="module")
def tiny():
    cfg, params = params_from_source(torch_source(make_model("qwen2", seed=3)))
    return cfg, params


def naive_nll(params, cfg, tokens):
    logits = np.asarray(transformer.forward(params, cfg, jnp.asarray(tokens)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                             keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    return -picked.sum(axis=1)


@pytest.mark.parametrize("seq_len", [9, 600])  # inside one lm_head chunk, and across two
def test_window_nll_matches_naive(tiny, seq_len):
    cfg, params = tiny
    tokens = np.random.default_rng(seq_len).integers(0, cfg.vocab_size, (2, seq_len))
    got = np.asarray(jax.jit(window_nll, static_argnums=1)(params, cfg, jnp.asarray(tokens)))
    want = naive_nll(params, cfg, tokens)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_batching_and_padding_do_not_change_result(tiny):
    cfg, params = tiny
    windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (5, 16))
    one = evaluate_perplexity(params, cfg, windows, batch_size=1, progress=False)
    three = evaluate_perplexity(params, cfg, windows, batch_size=3, progress=False)
    assert one.windows == three.windows == 5 and one.tokens == 5 * 15
    np.testing.assert_allclose(one.window_nll, three.window_nll, rtol=1e-5)
    assert math.isclose(one.ppl, three.ppl, rel_tol=1e-5)
    want = naive_nll(params, cfg, windows).sum() / (5 * 15)
    assert math.isclose(one.nll, want, rel_tol=1e-5)
    assert math.isclose(one.ppl, math.exp(one.nll), rel_tol=1e-12)


def test_data_parallel_over_simulated_devices(tiny, tmp_path):
    """The same evaluation on 4 simulated CPU devices gives the same perplexity."""
    cfg, params = tiny
    windows = np.random.default_rng(2).integers(0, cfg.vocab_size, (7, 12))
    single = evaluate_perplexity(params, cfg, windows, batch_size=3, progress=False)
    np.save(tmp_path / "windows.npy", windows)
    # The same model, without importing torch and transformers again in the subprocess.
    np.savez(tmp_path / "params.npz", **{k: np.asarray(v) for k, v in flatten(params).items()})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    script = textwrap.dedent(f"""
        import json, os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, numpy as np
        from jaxquant.eval import evaluate_perplexity
        from jaxquant.models.config import ModelConfig
        from jaxquant.params import unflatten
        assert len(jax.devices()) == 4, jax.devices()
        cfg = ModelConfig.from_dict(json.loads(open({str(tmp_path / "config.json")!r}).read()))
        params = unflatten(dict(np.load({str(tmp_path / "params.npz")!r})))
        w = np.load({str(tmp_path / "windows.npy")!r})
        r = evaluate_perplexity(params, cfg, w, batch_size=3, progress=False)
        print(json.dumps({{"ppl": r.ppl, "devices": r.devices, "batch": r.batch_size}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["batch"] == 4
    assert math.isclose(out["ppl"], single.ppl, rel_tol=1e-5)


def test_wikitext_preparation(tmp_path):
    f = tmp_path / "w.raw"
    f.write_bytes(b" = Title = \r\n\r\n First line .\r\n\r\n\r\n Second line .\r\n")
    assert load_text(f, "wikitext") == " = Title = \n\n First line .\n\n Second line ."
    assert load_text(f, "plain") == " = Title = \n\n First line .\n\n\n Second line .\n"


def test_folder_of_txt_files_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.md").write_text("ignored")
    assert load_text(tmp_path, "plain") == "first\n\nsecond"


def test_windows_non_overlapping_and_tail_dropped():
    ids = np.arange(10, dtype=np.int32)
    w = make_windows(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert make_windows(ids, 3, max_windows=2).shape == (2, 3)
    with pytest.raises(DataError, match="shorter than one window"):
        make_windows(ids, 11)


def test_sample_windows_follows_gptq_reference():
    ids = np.arange(5000, dtype=np.int32)
    got = sample_windows(ids, 100, 4, seed=0)
    random.seed(0)
    starts = [random.randint(0, 5000 - 100 - 1) for _ in range(4)]
    assert got.tolist() == [list(range(s, s + 100)) for s in starts]


def test_demo_corpus():
    text = load_text(None)
    assert text.startswith("In the beginning God created the heaven and the earth.")
    assert "[" not in text and len(text) > 3_000_000


def test_demo_corpus_testaments_split_the_bible():
    whole, ot, nt = (load_text(n) for n in ("kjv", "kjv-ot", "kjv-nt"))
    assert ot.startswith("In the beginning God created")
    assert nt.startswith("The book of the generation of Jesus Christ, the son of David")
    assert whole == ot + "\n" + nt
    assert "Jesus" not in ot and "Elijah the prophet" in ot.splitlines()[-1]
    assert len(nt) > 900_000  # ~230k tokens: room for 100 calibration windows of 2048


def test_cli_eval_json_report(tiny_hf_dir, tmp_path, capsys):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, d)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    rng = np.random.default_rng(0)
    (tmp_path / "t.txt").write_text(" ".join(f"w{i}" for i in rng.integers(0, 97, 100)))
    report = tmp_path / "r.json"
    code = main(["eval", "--model", str(d), "--data", str(tmp_path / "t.txt"),
                 "--data-format", "plain", "--seq-len", "16", "--max-windows", "4",
                 "--batch-size", "2", "--json", str(report), "--quiet"])
    assert code == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["windows"] == 4 and r["tokens"] == 4 * 15 and r["seconds"] > 0
    assert 1.0 < r["ppl"] < 1e6 and math.isfinite(r["ppl"])
    assert "ppl" in capsys.readouterr().out
