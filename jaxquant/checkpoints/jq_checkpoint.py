"""jaxquant checkpoints: Orbax-saved params + model config + tokenizer, written atomically.

Layout of a checkpoint directory::

    DIR/jaxquant.json   format marker, version, model config, dtype, source
    DIR/tokenizer.json  the tokenizer (if the model has one)
    DIR/params/         Orbax PyTree of the parameters, one raw (uncompressed) file per array

The directory is first written under a temporary name beside ``DIR`` and renamed
into place, so an interrupted write never leaves a half checkpoint, and an existing
``DIR`` is replaced only with ``force`` and only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxquant.errors import CheckpointError, ConfigError, OutputExistsError, one_line
from jaxquant.formats.base import from_layout, is_quantized
from jaxquant.models.config import ModelConfig
from jaxquant.params import iter_paths

MARKER = "jaxquant.json"
FORMAT = "jaxquant-checkpoint"
#: Format version written: 1 for float checkpoints, 2 for checkpoints with quantized
#: layers (which readers of version 1 cannot rebuild).
VERSION = 2


def is_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a jaxquant checkpoint directory."""
    return (Path(path) / MARKER).is_file()


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, force: bool) -> Iterator[Path]:
    """Yields a temporary directory that becomes ``out`` when the block succeeds.

    Raises:
      OutputExistsError: ``out`` exists and ``force`` is False.
    """
    out = Path(out).absolute()
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items() if v is not None}
    return tree


def _int_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {(int(k) if k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def _checkpointer():
    """Orbax PyTree checkpointer writing every array raw (no zstd) to its own file.

    Uncompressed, non-OCDBT storage makes the bytes of each array on disk equal to its
    bytes in memory, so the storage account of a quantized model holds on disk too
    (:func:`data_bytes`); compressing packed codes would gain little anyway.
    """
    import orbax.checkpoint as ocp  # slow import; only when checkpoints are used

    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False,
                                                         use_ocdbt=False))


def data_bytes(path: str | Path, prefix: str = "") -> int:
    """Bytes of array data on disk in a checkpoint's ``params/`` (chunk files only).

    Args:
      path: The checkpoint directory.
      prefix: Count only parameters whose path starts with this (e.g. a layer's path
        plus ``"."`` for its arrays).
    """
    root = Path(path) / "params"
    return sum(f.stat().st_size for f in root.rglob("*")
               if f.is_file() and re.fullmatch(r"\d+(\.\d+)*", f.name)
               and f.parent.name.startswith(prefix))


def _save_args(tree: Any) -> Any:
    import orbax.checkpoint as ocp

    return ocp.args.PyTreeSave(tree)


def save_checkpoint(
    out: str | Path,
    *,
    config: ModelConfig,
    params: Any,
    tokenizer: Any = None,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Writes a jaxquant checkpoint to ``out`` atomically; returns its path.

    Raises:
      CheckpointError: ``params`` hold weights in a backend kernel layout
        (:func:`jaxquant.backends.prepare`): checkpoints store the formats themselves.
    """
    for p, leaf in iter_paths(params):
        if type(leaf).__module__.startswith("pallas_kernels."):
            raise CheckpointError(
                f"{p} is in a kernel layout ({type(leaf).__name__}); save the parameters "
                "from quantize() or load_model(..., kernels=False), not prepared ones")
    with atomic_output_dir(out, force=force) as tmp:
        ckptr = _checkpointer()
        ckptr.save(tmp / "params", args=_save_args(_str_keys(params)))
        dtypes = sorted({str(np.dtype(x.dtype)) for x in jax.tree.leaves(params)})
        info = {
            "format": FORMAT,
            "version": VERSION if any(is_quantized(x) for _, x in iter_paths(params)) else 1,
            "config": config.to_dict(),
            "dtypes": dtypes,
            **dict(metadata or {}),
        }
        layout = {p: leaf.layout() for p, leaf in iter_paths(params) if is_quantized(leaf)}
        if layout:
            info["quantized_layout"] = layout
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_str())
    return Path(out)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The parsed ``jaxquant.json`` of a checkpoint."""
    marker = Path(path) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{marker} is unreadable: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{marker} is not a jaxquant checkpoint marker")
    if not isinstance(info.get("config"), dict):
        raise CheckpointError(f"{marker} has no model config")
    if not isinstance(info.get("version"), int):
        raise CheckpointError(f"{marker} has no integer format version")
    if info["version"] > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer jaxquant (format version {info['version']})"
        )
    return info


def _replace(params: Any, path: str, spec: Mapping[str, Any], *, where: str) -> Any:
    """Rebuilds the quantized format at ``path`` from its restored arrays."""
    keys = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = params
    try:
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = from_layout(node[keys[-1]], spec)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: quantized parameter {path} does not match its "
                              f"layout: {one_line(e)}") from e
    return params


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, Any, Any, dict[str, Any]]:
    """Loads ``(config, params, tokenizer, metadata)`` from a jaxquant checkpoint."""
    from jaxquant.checkpoints.tokenizer import load_tokenizer

    path = Path(path).absolute()
    info = read_metadata(path)
    try:
        config = ModelConfig.from_dict(info["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    try:
        with warnings.catch_warnings():  # single-process restore needs no sharding info
            warnings.filterwarnings("ignore", message="Sharding info not provided")
            params = _checkpointer().restore(path / "params")
    except Exception as e:  # Orbax raises many types for damaged files
        raise CheckpointError(f"{path}/params cannot be restored: {one_line(e)}") from e
    params = _int_keys(params)
    for param_path, spec in info.get("quantized_layout", {}).items():
        params = _replace(params, param_path, spec, where=str(path))
    from jaxquant.checkpoints.convert import check_params

    check_params(params, config, where=str(path))
    return config, params, load_tokenizer(path), info
