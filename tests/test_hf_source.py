"""Tests of reading Hugging Face model directories (safetensors, Flax msgpack, tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import serialization
from safetensors.numpy import save_file
from safetensors.torch import save_file as torch_save_file

from jaxquant.checkpoints.hf_source import read_hf_dir
from jaxquant.checkpoints.tokenizer import decode, encode, load_tokenizer
from jaxquant.errors import CheckpointError, ConfigError


def _tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return transformers.LlamaForCausalLM(cfg)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy, keeping bfloat16 (as ml_dtypes.bfloat16)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    return _tiny_llama()


@pytest.fixture(scope="module")
def state_dict(model: transformers.LlamaForCausalLM) -> dict[str, np.ndarray]:
    return {k: _to_numpy(v.detach()) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def single_dir(model: transformers.LlamaForCausalLM, tmp_path_factory: Any) -> Path:
    d = tmp_path_factory.mktemp("single")
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sharded_dir(model: transformers.LlamaForCausalLM, tmp_path_factory: Any) -> Path:
    d = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(d, max_shard_size="20KB")
    return d


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _read_all(path: Path) -> dict[str, np.ndarray]:
    source = read_hf_dir(path)
    arrays = dict(source.tensors())
    assert tuple(arrays) == source.names
    return arrays


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name].view(np.uint8), array.view(np.uint8), name)


def _error(cls: type[Exception], path: Path) -> str:
    with pytest.raises(cls) as info:
        read_hf_dir(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------
# safetensors


def test_single_file_float32(single_dir: Path, state_dict: dict[str, np.ndarray]) -> None:
    source = read_hf_dir(single_dir)
    assert source.format == "safetensors"
    assert source.path == str(single_dir)
    assert source.hf_config["model_type"] == "llama"
    assert source.hf_config["num_key_value_heads"] == 2
    assert source.tokenizer is None
    assert "model.layers.1.self_attn.q_proj.weight" in source.names
    assert all(a.dtype == np.float32 for a in state_dict.values())
    _assert_same(dict(source.tensors()), state_dict)
    # The source can be streamed again.
    assert [name for name, _ in source.tensors()] == list(source.names)


def test_bfloat16_round_trip(model: transformers.LlamaForCausalLM, tmp_path: Path) -> None:
    bf16 = _tiny_llama().to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    want = {k: _to_numpy(v.detach()) for k, v in bf16.state_dict().items()}
    got = _read_all(tmp_path)
    assert got["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    _assert_same(got, want)


def test_float8_is_rejected(tmp_path: Path) -> None:
    """safetensors' numpy backend has no float8: such a file is refused up front."""
    (tmp_path / "config.json").write_text("{}")
    w = torch.linspace(-2, 2, 12).reshape(3, 4).to(torch.float8_e4m3fn)
    torch_save_file({"b": torch.ones(2), "w": w}, str(tmp_path / "model.safetensors"))
    message = _error(CheckpointError, tmp_path)
    assert message.startswith(f"{tmp_path / 'model.safetensors'}: tensor 'w' is F8_E4M3; ")
    assert "float8 safetensors are not supported" in message


def test_sharded(sharded_dir: Path, state_dict: dict[str, np.ndarray]) -> None:
    assert len(list(sharded_dir.glob("model-*-of-*.safetensors"))) > 1
    assert not (sharded_dir / "model.safetensors").exists()
    source = read_hf_dir(sharded_dir)
    assert source.format == "safetensors"
    _assert_same(_read_all(sharded_dir), state_dict)


def test_single_file_preferred_over_index(
    single_dir: Path, sharded_dir: Path, tmp_path: Path
) -> None:
    d = _copy(single_dir, tmp_path)
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "missing.safetensors" for k in index["weight_map"]}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(read_hf_dir(d).names) == 21


def test_multimodal_prefixes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def t() -> np.ndarray:
        return rng.standard_normal((2, 3)).astype(np.float32)

    new_style = {
        "model.language_model.embed_tokens.weight": t(),
        "model.language_model.layers.0.mlp.up_proj.weight": t(),
        "model.language_model.norm.weight": t(),
        "model.vision_tower.vision_model.embeddings.patch_embedding.weight": t(),
        "model.multi_modal_projector.mm_input_projection_weight": t(),
        "lm_head.weight": t(),
    }
    old_style = {
        "language_model.model.embed_tokens.weight": t(),
        "language_model.model.layers.0.mlp.up_proj.weight": t(),
        "language_model.model.norm.weight": t(),
        "language_model.lm_head.weight": t(),
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": t(),
        "multi_modal_projector.mm_soft_emb_norm.weight": t(),
    }
    want_names = {
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
    for i, tensors in enumerate((new_style, old_style)):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "gemma3", "text_config": {}}')
        save_file(tensors, str(d / "model.safetensors"))
        got = _read_all(d)
        assert set(got) == want_names
        stored = next(k for k in tensors if k.endswith("up_proj.weight"))
        np.testing.assert_array_equal(got["model.layers.0.mlp.up_proj.weight"], tensors[stored])


def test_duplicate_names_after_prefix_mapping(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    x = np.zeros((2,), np.float32)
    save_file(
        {"model.norm.weight": x, "model.language_model.norm.weight": x},
        str(tmp_path / "model.safetensors"),
    )
    message = _error(CheckpointError, tmp_path)
    assert "model.safetensors" in message and "both map to 'model.norm.weight'" in message


# ---------------------------------------------------------------------------
# Flax msgpack


def _flax_tree(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
    """The state dict in transformers' Flax conventions (kernel [in, out], embedding)."""
    tree: dict[str, Any] = {}
    for name, array in state_dict.items():
        *parents, leaf = name.split(".")
        if parents[-1] == "embed_tokens":
            leaf = "embedding"
        elif array.ndim == 2:
            leaf, array = "kernel", np.ascontiguousarray(array.T)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = array
    return tree


@pytest.mark.parametrize("wrap_params", [False, True])
def test_msgpack(
    single_dir: Path, state_dict: dict[str, np.ndarray], tmp_path: Path, wrap_params: bool
) -> None:
    shutil.copy(single_dir / "config.json", tmp_path / "config.json")
    tree = _flax_tree(state_dict)
    assert tree["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
    assert tree["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"].shape == (64, 32)
    if wrap_params:
        tree = {"params": tree}
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    source = read_hf_dir(tmp_path)
    assert source.format == "msgpack"
    assert source.hf_config["model_type"] == "llama"
    got = _read_all(tmp_path)
    _assert_same(got, state_dict)
    assert all(a.flags["C_CONTIGUOUS"] for a in got.values())


def test_msgpack_bfloat16_and_bias(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    bias = np.ones(3, ml_dtypes.bfloat16)
    tree = {"lm_head": {"kernel": kernel, "bias": bias}, "model": {"norm": {"scale": bias}}}
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    got = _read_all(tmp_path)
    assert set(got) == {"lm_head.weight", "lm_head.bias", "model.norm.weight"}
    assert got["lm_head.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["lm_head.weight"], kernel.T)
    np.testing.assert_array_equal(got["lm_head.bias"], bias)


def _write_sharded_msgpack(d: Path, state_dict: dict[str, np.ndarray]) -> list[str]:
    (d / "config.json").write_text('{"model_type": "llama"}')
    paths = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                paths[f"{prefix}{k}"] = v

    walk(_flax_tree(state_dict), "")
    names = sorted(paths)
    shards = ["flax_model-00001-of-00002.msgpack", "flax_model-00002-of-00002.msgpack"]
    weight_map = {}
    for i, shard in enumerate(shards):
        part: dict[str, Any] = {}
        for path in names[i::2]:
            node = part
            *parents, leaf = path.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = paths[path]
            weight_map[path] = shard
        (d / shard).write_bytes(serialization.msgpack_serialize(part))
    index = {"metadata": {}, "weight_map": weight_map}
    (d / "flax_model.msgpack.index.json").write_text(json.dumps(index))
    return shards


def test_msgpack_sharded(state_dict: dict[str, np.ndarray], tmp_path: Path) -> None:
    _write_sharded_msgpack(tmp_path, state_dict)
    assert read_hf_dir(tmp_path).format == "msgpack"
    _assert_same(_read_all(tmp_path), state_dict)


# ---------------------------------------------------------------------------
# tokenizer


def _tiny_tokenizer() -> tokenizers.Tokenizer:
    vocab = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3, "!": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(cleanup=False)
    tok.add_special_tokens(["<s>"])
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return tok


def test_tokenizer_round_trip(single_dir: Path, tmp_path: Path) -> None:
    d = _copy(single_dir, tmp_path)
    _tiny_tokenizer().save(str(d / "tokenizer.json"))
    tok = read_hf_dir(d).tokenizer
    assert isinstance(tok, tokenizers.Tokenizer)
    ids = encode(tok, "hello world !")
    assert ids == [2, 3, 4]  # no <s>: special tokens are not added
    assert tok.encode("hello").ids == [1, 2]
    assert decode(tok, np.array(ids)) == "hello world !"
    assert decode(tok, [1, 2]) == "hello"
    assert decode(tok, [1, 2], skip_special_tokens=False) == "<s> hello"
    assert load_tokenizer(d / "tokenizer.json") is not None
    assert load_tokenizer(single_dir) is None


def test_malformed_tokenizer(single_dir: Path, tmp_path: Path) -> None:
    d = _copy(single_dir, tmp_path)
    (d / "tokenizer.json").write_text('{"model": ')
    message = _error(CheckpointError, d)
    assert "tokenizer.json is not a valid tokenizer" in message
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a valid tokenizer"):
        load_tokenizer(d)


# ---------------------------------------------------------------------------
# errors: directory and config


def test_missing_dir(tmp_path: Path) -> None:
    message = _error(CheckpointError, tmp_path / "nope")
    assert message == f"no such directory: {tmp_path / 'nope'}"


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert "is not a directory" in _error(CheckpointError, tmp_path / "f")


def test_missing_config(single_dir: Path, tmp_path: Path) -> None:
    d = _copy(single_dir, tmp_path)
    (d / "config.json").unlink()
    assert _error(CheckpointError, d) == f"no config.json in {d}"


def test_malformed_config(single_dir: Path, tmp_path: Path) -> None:
    d = _copy(single_dir, tmp_path)
    (d / "config.json").write_text('{\n  "model_type": "llama"\n  "x": 1\n}')
    message = _error(ConfigError, d)
    assert message.startswith(f"{d / 'config.json'} is not valid JSON: ")
    assert "at line 3 column 3" in message


def test_config_not_an_object(single_dir: Path, tmp_path: Path) -> None:
    d = _copy(single_dir, tmp_path)
    (d / "config.json").write_text("[1, 2]")
    message = _error(ConfigError, d)
    assert "config.json must hold a JSON object, but holds a list" in message


def test_no_weights(single_dir: Path, tmp_path: Path) -> None:
    d = _copy(single_dir, tmp_path)
    (d / "model.safetensors").unlink()
    message = _error(CheckpointError, d)
    assert message.startswith(f"no weights in {d}: looked for model.safetensors, ")
    for name in ("model.safetensors.index.json", "flax_model.msgpack", "msgpack.index.json"):
        assert name in message
    (d / "pytorch_model.bin").write_bytes(b"")
    assert "found pytorch_model.bin (PyTorch pickle)" in _error(CheckpointError, d)


# ---------------------------------------------------------------------------
# errors: safetensors


def test_truncated_safetensors(single_dir: Path, tmp_path: Path) -> None:
    d = _copy(single_dir, tmp_path)
    file = d / "model.safetensors"
    size = file.stat().st_size
    os.truncate(file, size - 100)
    message = _error(CheckpointError, d)
    assert message.startswith(f"{file} is truncated or corrupt: ")
    assert "file not fully covered" in message  # safetensors' words for a short file


def test_safetensors_header_truncated(single_dir: Path, tmp_path: Path) -> None:
    d = _copy(single_dir, tmp_path)
    file = d / "model.safetensors"
    os.truncate(file, 50)
    message = _error(CheckpointError, d)
    assert message.startswith(f"{file} is truncated or corrupt: ")
    assert "invalid header length" in message
    os.truncate(file, 3)
    message = _error(CheckpointError, d)
    assert message.startswith(f"{file} is truncated or corrupt: ")
    assert "header too small" in message


def test_corrupt_safetensors_header(single_dir: Path, tmp_path: Path) -> None:
    d = _copy(single_dir, tmp_path)
    file = d / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"#" * 12
    file.write_bytes(bytes(data))
    message = _error(CheckpointError, d)
    assert message.startswith(f"{file} is truncated or corrupt: ")
    assert "invalid JSON in header" in message


def test_safetensors_header_size_mismatch(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})
    data = struct.pack("<Q", len(header)) + header.encode() + bytes(12)
    (tmp_path / "model.safetensors").write_bytes(data)
    message = _error(CheckpointError, tmp_path)
    assert message.startswith(f"{tmp_path / 'model.safetensors'} is truncated or corrupt: ")
    assert "invalid shape, data type, or offset for tensor" in message


def test_safetensors_rejected_by_library(single_dir: Path, tmp_path: Path) -> None:
    """Trailing junk after the tensor data is rejected too."""
    d = _copy(single_dir, tmp_path)
    with open(d / "model.safetensors", "ab") as f:
        f.write(b"junk")
    message = _error(CheckpointError, d)
    assert message.startswith(f"{d / 'model.safetensors'} is truncated or corrupt: ")


def test_index_names_missing_shard(sharded_dir: Path, tmp_path: Path) -> None:
    d = _copy(sharded_dir, tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[1].name
    (d / shard).unlink()
    message = _error(CheckpointError, d)
    assert message == (
        f"{d / 'model.safetensors.index.json'} names shard {shard}, which does not exist in {d}"
    )


def test_index_maps_tensor_not_in_shard(sharded_dir: Path, tmp_path: Path) -> None:
    d = _copy(sharded_dir, tmp_path)
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.extra.weight"] = index["weight_map"]["lm_head.weight"]
    index_file.write_text(json.dumps(index))
    message = _error(CheckpointError, d)
    assert message.startswith(f"{index_file} maps 'model.extra.weight' to model-")
    assert message.endswith("which has no such tensor")


def test_malformed_index(sharded_dir: Path, tmp_path: Path) -> None:
    d = _copy(sharded_dir, tmp_path)
    index_file = d / "model.safetensors.index.json"
    index_file.write_text('{"weight_map": ')
    assert _error(CheckpointError, d).startswith(f"{index_file} is not valid JSON: ")
    index_file.write_text('{"metadata": {}}')
    assert (
        _error(CheckpointError, d) == f"{index_file} has no weight_map (tensor name -> shard file)"
    )


# ---------------------------------------------------------------------------
# errors: msgpack


def test_truncated_msgpack(state_dict: dict[str, np.ndarray], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    data = serialization.msgpack_serialize(_flax_tree(state_dict))
    file = tmp_path / "flax_model.msgpack"
    file.write_bytes(data[: len(data) // 2])
    message = _error(CheckpointError, tmp_path)
    assert message.startswith(f"{file} is truncated or corrupt: ")
    assert "incomplete input" in message
    file.write_bytes(b"\xc1garbage")
    assert _error(CheckpointError, tmp_path).startswith(f"{file} is truncated or corrupt: ")
    file.write_bytes(serialization.msgpack_serialize([np.zeros(2)]))
    assert "expected a dict of parameters" in _error(CheckpointError, tmp_path)


def test_msgpack_index_names_missing_shard(
    state_dict: dict[str, np.ndarray], tmp_path: Path
) -> None:
    shards = _write_sharded_msgpack(tmp_path, state_dict)
    (tmp_path / shards[1]).unlink()
    message = _error(CheckpointError, tmp_path)
    assert message == (
        f"{tmp_path / 'flax_model.msgpack.index.json'} names shard {shards[1]}, "
        f"which does not exist in {tmp_path}"
    )
