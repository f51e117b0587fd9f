"""Reads a Hugging Face model directory into a :class:`CheckpointSource`.

A directory holds ``config.json`` and weights in one of these forms, tried in this
order:

1. ``model.safetensors``;
2. ``model.safetensors.index.json`` whose ``weight_map`` names the shards
   (``model-00001-of-00003.safetensors``, ...);
3. ``flax_model.msgpack``, the legacy format of transformers' Flax models;
4. ``flax_model.msgpack.index.json`` with its ``flax_model-0000N-of-0000M.msgpack``
   shards.

Safetensors files are read lazily with ``safetensors.safe_open``, one tensor at a
time, so peak host memory stays near one tensor plus what the converter keeps.
bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays; float8 ones are not
supported. Every file is opened when the directory is read (before any data is
streamed), so safetensors' own header checks report a malformed header or a file
shorter than its header says (a truncated download) at once.

Flax msgpack files cannot be read piecewise: ``flax.serialization.msgpack_restore``
decodes a whole file at once, so reading one needs about twice the file's size in
host memory while it is decoded (the file's bytes plus the arrays), and about the
file's size afterwards, falling as the tensors are streamed out. The file is
decoded once when the directory is read (to list the tensor names; nothing is kept)
and again each time the tensors are streamed.

Tensor names come out as Hugging Face names. Two adjustments are made:

* Multimodal checkpoints (Gemma 3 ``Gemma3ForConditionalGeneration``, LLaVA-style
  models) store the text model under a prefix: ``language_model.model.*`` and
  ``language_model.lm_head.*`` (older files) or ``model.language_model.*`` (newer
  files). These come out as ``model.*`` and ``lm_head.*``, e.g.
  ``model.language_model.layers.0.mlp.up_proj.weight`` becomes
  ``model.layers.0.mlp.up_proj.weight``.
* Their vision parts (``vision_tower.*``, ``multi_modal_projector.*``, with or
  without a leading ``model.``) are skipped: they are not listed in ``names`` and
  not streamed. Only the text model is quantized.

``hf_config`` is ``config.json`` as stored; for multimodal checkpoints the text
model's settings are under its ``text_config`` key.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for safetensors)
import numpy as np
from flax import serialization
from safetensors import safe_open

from jaxquant.checkpoints.source import CheckpointSource
from jaxquant.checkpoints.tokenizer import load_tokenizer
from jaxquant.errors import CheckpointError, ConfigError, one_line

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
MSGPACK_NAME = "flax_model.msgpack"
MSGPACK_INDEX_NAME = "flax_model.msgpack.index.json"

# The weight files read_hf_dir looks for, in order of preference.
_WEIGHT_FILES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, MSGPACK_NAME, MSGPACK_INDEX_NAME)

# Weights jaxquant does not read, named in the "no weights" message when present.
_UNSUPPORTED_WEIGHTS = {
    "pytorch_model.bin": "PyTorch pickle",
    "pytorch_model.bin.index.json": "PyTorch pickle",
    "tf_model.h5": "TensorFlow",
    "consolidated.safetensors": "Mistral native",
}

# Stored-name prefixes of multimodal checkpoints mapped to plain text-model names.
# Checked in order; the first that matches is replaced.
_RENAMED_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
# Stored-name prefixes of the vision parts of multimodal checkpoints; skipped.
_SKIPPED_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def hf_name(stored_name: str) -> str | None:
    """Maps a stored tensor name to its Hugging Face text-model name.

    Args:
      stored_name: The name as stored in the checkpoint.

    Returns:
      The name with a multimodal text-model prefix replaced (see the module
      docstring), the name unchanged if it has none, or ``None`` for a tensor of a
      vision tower or multimodal projector, which is skipped.
    """
    if stored_name.startswith(_SKIPPED_PREFIXES):
        return None
    for old, new in _RENAMED_PREFIXES:
        if stored_name.startswith(old):
            return new + stored_name[len(old) :]
    return stored_name


def _add_name(names: dict[str, str], name: str, stored: str, file: str) -> None:
    """Records ``name`` (from ``stored``), rejecting two tensors with one name."""
    if name in names:
        raise CheckpointError(
            f"{file}: tensors {names[name]!r} and {stored!r} both map to {name!r}"
        )
    names[name] = stored


# ---------------------------------------------------------------------------
# config.json and index files


def _read_config(directory: str) -> dict[str, Any]:
    """Reads ``config.json`` from ``directory``."""
    file = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(file):
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}")
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file} is not valid UTF-8 text: {one_line(e)}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or one_line(e)}") from e
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{file} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    if not isinstance(config, dict):
        raise ConfigError(f"{file} must hold a JSON object, but holds a {type(config).__name__}")
    return config


def _read_weight_map(index_file: str) -> dict[str, str]:
    """Reads the ``weight_map`` (tensor name -> shard file name) of an index file."""
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{index_file} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {index_file}: {one_line(e)}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file} has no weight_map (tensor name -> shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index_file} maps {name!r} to {shard!r}, not a file name")
    return weight_map


def _shard_files(
    directory: str, index_file: str, weight_map: dict[str, str]
) -> dict[str, set[str]]:
    """Groups an index's tensor names by shard path; every shard must exist.

    Returns:
      Shard path -> names of the tensors the index maps to it, sorted by path.
    """
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, set()).add(name)
    files = {}
    for shard in sorted(shards):
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise CheckpointError(f"{index_file} names shard {shard!r} outside {directory}")
        file = os.path.join(directory, shard)
        if not os.path.isfile(file):
            raise CheckpointError(
                f"{index_file} names shard {shard}, which does not exist in {directory}"
            )
        files[file] = shards[shard]
    return files


# ---------------------------------------------------------------------------
# safetensors


def _corrupt(file: str, reason: str) -> CheckpointError:
    return CheckpointError(f"{file} is truncated or corrupt: {reason}")


def _open_safetensors(file: str) -> Any:
    """Opens ``file`` with ``safetensors.safe_open`` for numpy, wrapping its errors.

    safetensors checks the whole header when it opens a file: a malformed header, an
    entry whose byte range does not fit its dtype and shape, or a file shorter (or
    longer) than the header says (a truncated download) is rejected here.
    """
    try:
        return safe_open(file, framework="np")
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or one_line(e)}") from e
    except Exception as e:  # SafetensorError
        raise _corrupt(file, one_line(e)) from e


def _plan_safetensors(
    files: dict[str, set[str] | None], index_file: str | None
) -> tuple[list[tuple[str, list[tuple[str, str]]]], tuple[str, ...]]:
    """Checks every file's header and lists what to read from each.

    Args:
      files: Safetensors file -> the stored names the index maps to it (only those
        are read from it), or ``None`` to read all its tensors.
      index_file: The index, for messages; ``None`` for a single file.

    Returns:
      ``[(file, [(hf_name, stored_name), ...]), ...]`` and all Hugging Face names,
      in reading order (each file's tensors in the order of their data).
    """
    plan = []
    names: dict[str, str] = {}
    for file, wanted in files.items():
        with _open_safetensors(file) as handle:
            stored_names = handle.offset_keys()
            for stored in stored_names:
                dtype = handle.get_slice(stored).get_dtype()
                if dtype.startswith(("F8", "F6", "F4")):  # no numpy dtype to read them as
                    raise CheckpointError(
                        f"{file}: tensor {stored!r} is {dtype}; float8 safetensors are not "
                        "supported (convert the checkpoint to bfloat16 first)"
                    )
        if wanted is not None:
            missing = sorted(wanted - set(stored_names))
            if missing:
                raise CheckpointError(
                    f"{index_file} maps {missing[0]!r} to {os.path.basename(file)}, "
                    "which has no such tensor"
                )
            stored_names = [n for n in stored_names if n in wanted]
        entries = []
        for stored in stored_names:
            name = hf_name(stored)
            if name is None:
                continue
            _add_name(names, name, stored, file)
            entries.append((name, stored))
        plan.append((file, entries))
    return plan, tuple(names)


def _stream_safetensors(
    plan: list[tuple[str, list[tuple[str, str]]]],
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` for every planned tensor, one at a time.

    bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays.
    """
    for file, entries in plan:
        if not entries:
            continue
        with _open_safetensors(file) as handle:
            for name, stored in entries:
                try:
                    array = handle.get_tensor(stored)
                except Exception as e:
                    raise _corrupt(file, f"cannot read tensor {stored!r}: {one_line(e)}") from e
                yield name, array


# ---------------------------------------------------------------------------
# Flax msgpack


def _restore_msgpack(file: str) -> dict[str, Any]:
    """Decodes a whole Flax msgpack file into its nested parameter dict."""
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or one_line(e)}") from e
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises ValueError, FormatError, ExtraData, ...
        raise _corrupt(file, one_line(e)) from e
    del data
    if not isinstance(tree, dict):
        raise _corrupt(file, f"expected a dict of parameters, found {type(tree).__name__}")
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    return tree


def _flatten(
    tree: dict[str, Any], file: str, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yields ``(path, array)`` for every leaf of a restored Flax parameter dict."""
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            yield from _flatten(value, file, path)
        elif isinstance(value, (np.ndarray, np.generic)):
            yield path, np.asarray(value)
        else:
            raise _corrupt(file, f"{'/'.join(path)} holds a {type(value).__name__}, not an array")


def flax_to_hf(path: tuple[str, ...], array: np.ndarray) -> tuple[str, np.ndarray]:
    """Maps one Flax parameter to its Hugging Face name and layout.

    transformers' Flax models name parameters like their PyTorch twins, except for
    the leaf: ``kernel`` (a ``Dense`` weight, ``[in, out]``; transposed to
    ``[out, in]``), ``embedding`` (``Embed``) and ``scale`` (``LayerNorm``) all
    become ``weight``. A 4-D (convolution) kernel, ``[h, w, in, out]``, becomes
    ``[out, in, h, w]``.

    Args:
      path: The parameter's path in the nested dict, e.g.
        ``("model", "layers", "0", "self_attn", "q_proj", "kernel")``.
      array: The parameter.

    Returns:
      The Hugging Face name (e.g. ``model.layers.0.self_attn.q_proj.weight``) and
      the array in Hugging Face layout.

    Raises:
      ValueError: A kernel that is neither 2-D nor 4-D.
    """
    *parents, leaf = path
    if leaf == "kernel":
        if array.ndim == 2:
            array = np.ascontiguousarray(array.T)
        elif array.ndim == 4:
            array = np.ascontiguousarray(array.transpose(3, 2, 0, 1))
        else:
            raise ValueError(f"kernel {'/'.join(path)} has {array.ndim} dimensions, not 2 or 4")
        leaf = "weight"
    elif leaf in ("embedding", "scale"):
        leaf = "weight"
    return ".".join((*parents, leaf)), array


def _stream_msgpack_file(file: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yields ``(hf_name, flax_path, array)`` for the tensors of one msgpack file.

    Multimodal prefixes are mapped and vision tensors skipped (see :func:`hf_name`).
    Each array is dropped from the decoded tree before it is yielded, so memory
    falls as the tensors are consumed.
    """
    leaves = deque(_flatten(_restore_msgpack(file), file))
    while leaves:
        path, array = leaves.popleft()
        try:
            name, array = flax_to_hf(path, array)
        except ValueError as e:
            raise _corrupt(file, str(e)) from e
        name = hf_name(name)
        if name is not None:
            yield name, "/".join(path), array


def _plan_msgpack(files: dict[str, set[str] | None], index_file: str | None) -> tuple[str, ...]:
    """Decodes every msgpack file once to check it and list its tensor names.

    Args:
      files: Msgpack file -> the Flax paths (``model/layers/0/...``) the index maps
        to it, or ``None`` for a single file.
      index_file: The index, for messages; ``None`` for a single file.

    Returns:
      All Hugging Face names, in reading order.
    """
    names: dict[str, str] = {}
    for file, wanted in files.items():
        paths = set()
        for name, path, _ in _stream_msgpack_file(file):
            _add_name(names, name, path, file)
            paths.add(path)
        if wanted is not None:
            missing = sorted(
                n
                for n in wanted
                if n.removeprefix("params/") not in paths
                # Skipped (vision) tensors are not in `paths`.
                and hf_name(n.removeprefix("params/").replace("/", ".")) is not None
            )
            if missing:
                raise CheckpointError(
                    f"{index_file} maps {missing[0]!r} to {os.path.basename(file)}, "
                    "which has no such tensor"
                )
    return tuple(names)


def _stream_msgpack(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` for every tensor of the msgpack files."""
    for file in files:
        for name, _, array in _stream_msgpack_file(file):
            yield name, array


# ---------------------------------------------------------------------------
# The directory


def _no_weights_error(directory: str) -> CheckpointError:
    looked_for = ", ".join(_WEIGHT_FILES)
    message = f"no weights in {directory}: looked for {looked_for}"
    found = [
        f"{name} ({kind})"
        for name, kind in _UNSUPPORTED_WEIGHTS.items()
        if os.path.isfile(os.path.join(directory, name))
    ]
    if found:
        message += (
            f"; found {', '.join(found)}, which jaxquant does not read "
            "(re-save with transformers' save_pretrained to get safetensors)"
        )
    return CheckpointError(message)


def read_hf_dir(path: str | os.PathLike[str]) -> CheckpointSource:
    """Reads a Hugging Face model directory (see the module docstring).

    Reads ``config.json``, checks the weight files' headers (safetensors) or
    decodes them once (msgpack), and loads ``tokenizer.json`` if present. Tensor
    data is read only when the returned source's ``tensors()`` is iterated.

    Args:
      path: The model directory.

    Returns:
      The checkpoint, with ``format`` ``"safetensors"`` or ``"msgpack"``.

    Raises:
      CheckpointError: The directory, ``config.json`` or the weights are missing,
        or a weight file, an index or ``tokenizer.json`` is malformed, truncated or
        corrupt.
      ConfigError: ``config.json`` is not a valid JSON object.
    """
    directory = os.fspath(path)
    if not os.path.exists(directory):
        raise CheckpointError(f"no such directory: {directory}")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory (expected a model directory)")
    config = _read_config(directory)

    def exists(name: str) -> bool:
        return os.path.isfile(os.path.join(directory, name))

    def weight_files(single: str, index: str) -> tuple[dict[str, set[str] | None], str | None]:
        if exists(single):
            return {os.path.join(directory, single): None}, None
        index_file = os.path.join(directory, index)
        return dict(_shard_files(directory, index_file, _read_weight_map(index_file))), index_file

    if exists(SAFETENSORS_NAME) or exists(SAFETENSORS_INDEX_NAME):
        fmt = "safetensors"
        plan, names = _plan_safetensors(*weight_files(SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME))

        def read() -> Iterator[tuple[str, np.ndarray]]:
            return _stream_safetensors(plan)

    elif exists(MSGPACK_NAME) or exists(MSGPACK_INDEX_NAME):
        fmt = "msgpack"
        files, index_file = weight_files(MSGPACK_NAME, MSGPACK_INDEX_NAME)
        names = _plan_msgpack(files, index_file)

        def read() -> Iterator[tuple[str, np.ndarray]]:
            return _stream_msgpack(list(files))

    else:
        raise _no_weights_error(directory)

    return CheckpointSource(
        path=directory,
        format=fmt,
        hf_config=config,
        names=names,
        read=read,
        tokenizer=load_tokenizer(directory),
    )
