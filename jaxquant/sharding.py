"""Device meshes and partition rules for float and quantized parameters.

A jaxquant mesh has two named axes: ``data`` (the batch of windows is split over it)
and ``model`` (tensor parallelism: weights are split over it). Parameters are always
replicated over ``data``. :func:`param_shardings` gives every leaf of a parameter
pytree a :class:`jax.sharding.NamedSharding`; :func:`shard_params` places the tree.
Under ``jax.jit`` XLA's SPMD partitioner then runs the unchanged forward on the mesh
(the layouts below only decide where each array lives; XLA inserts whatever
communication the computation needs, so a layout can cost speed but never change a
result).

Linear weights are ``[out, in]`` (``y = x W^T``). Layers that *produce* a split
activation are column-parallel (the output axis is split: ``q/k/v_proj``,
``gate/up_proj``, ``lm_head``, and the embedding table's vocabulary axis, which is the
output axis of a tied ``lm_head``); layers that *consume* it are row-parallel (the input
axis is split: ``o_proj``, ``down_proj``), as Megatron-LM lays out a transformer. Every
array of a quantized format is split consistently with the weight it belongs to:

=================  ==========================================  ============================
format             column-parallel (split ``out``)             row-parallel (split ``in``)
=================  ==========================================  ============================
float array        ``[out, in]`` rows                          columns
``UniformWeight``  bit planes and scales/zeros by row          plane words by column when
                                                               ``in / M`` is a multiple of
                                                               32 (whole uint32 words of
                                                               every plane); scales/zeros
                                                               by group when the groups
                                                               split at the same place,
                                                               else replicated (per-channel
                                                               scales: one column)
``CodebookWeight`` index planes by row; codebook replicated    index words by column (as
                   (a table per *input* channel)               above); codebook rows (its
                                                               input channels) split too
``MixedWeight``    every part by row; permutation replicated   **fallback**: column-parallel
                                                               (the input permutation
                                                               gathers across any split of
                                                               ``in``)
``OutlierWeight``  base by its rule; **index and values        base by its rule; index and
                   replicated** (flat positions, uneven        values replicated
                   per row)
=================  ==========================================  ============================

Fallbacks, applied per weight and reported by :func:`describe_layout`: a row-parallel
weight whose input axis does not split as above is split along its output axis
instead; a weight whose output axis does not divide by the model axis size either is
replicated. Biases of column-parallel layers are split with their rows; norms, scalars,
and any leaf of a type not listed (for example kernel layouts from
:func:`jaxquant.backends.prepare`) are replicated.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxquant.errors import MeshError
from jaxquant.formats.base import QuantizedWeight
from jaxquant.formats.codebook import CodebookWeight
from jaxquant.formats.mixed import MixedWeight
from jaxquant.formats.outliers import OutlierWeight
from jaxquant.formats.uniform import UniformWeight, num_groups
from jaxquant.params import flatten, unflatten

#: The mesh axes, in order.
AXES = ("data", "model")
DATA, MODEL = AXES

#: Output-axis-split (column-parallel) weights, and the embedding table.
_COLUMN = re.compile(r"(.*\.)?((q|k|v|gate|up)_proj\.weight|lm_head\.weight|"
                     r"embed_tokens\.weight)")
#: Input-axis-split (row-parallel) weights.
_ROW = re.compile(r"(.*\.)?(o|down)_proj\.weight")
#: Biases that follow their column-parallel weight's rows.
_COLUMN_BIAS = re.compile(r"(.*\.)?(q|k|v|gate|up)_proj\.bias")

#: Codes per uint32 word of a 1-bit plane: a split of ``in`` at a multiple of this cuts
#: every plane (1, 2, 4 or 8 bits wide) at a word boundary.
_WORD_CODES = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """The shape of a ``data`` x ``model`` device mesh.

    Parse the CLI form with :meth:`parse` (``"data=4,model=2"``); :meth:`resolve`
    checks it against a device count.
    """

    data: int | None = None  # devices along "data" (None: all the model axis leaves)
    model: int = 1  # devices along "model" (tensor parallelism); 1: weights replicated

    def __post_init__(self) -> None:
        for name in AXES:
            value = getattr(self, name)
            if value is None and name == DATA:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MeshError(f"mesh axis {name} must be a positive integer, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """``"data=D,model=M"`` (either part may be left out) -> :class:`MeshConfig`.

        Raises:
          MeshError: an unknown axis, a repeated axis, or a size that is not a positive
            integer.
        """
        sizes: dict[str, int] = {}
        for part in (p.strip() for p in str(text).split(",")):
            name, sep, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                raise MeshError(f"mesh {text!r}: expected AXIS=SIZE pairs such as "
                                "data=4,model=2")
            if name not in AXES:
                raise MeshError(f"mesh {text!r}: unknown axis {name!r} (axes: data, model)")
            if name in sizes:
                raise MeshError(f"mesh {text!r}: axis {name} given twice")
            try:
                size = int(value)
            except ValueError:
                raise MeshError(f"mesh {text!r}: size of {name} must be a positive integer, "
                                f"got {value!r}") from None
            if size < 1:
                raise MeshError(f"mesh {text!r}: size of {name} must be a positive integer, "
                                f"got {size}")
            sizes[name] = size
        return cls(**sizes)

    def resolve(self, num_devices: int) -> MeshConfig:
        """This shape with ``data`` filled in, checked against ``num_devices`` devices.

        Raises:
          MeshError: the product of the axes is not the number of devices.
        """
        if self.data is None:
            if num_devices % self.model:
                raise MeshError(f"mesh model={self.model} does not divide the "
                                f"{num_devices} devices")
            return MeshConfig(data=num_devices // self.model, model=self.model)
        if self.data * self.model != num_devices:
            raise MeshError(f"mesh data={self.data},model={self.model} has "
                            f"{self.data * self.model} devices, but {num_devices} are "
                            f"available: the product must equal the device count")
        return self

    def __str__(self) -> str:
        data = "*" if self.data is None else str(self.data)
        return f"data={data},model={self.model}"


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("data", "model")`` mesh over ``devices``.

    Devices are ordered by process, then id, and laid out row-major, so that with
    several hosts each host's devices hold consecutive ``data`` rows (and a ``model``
    axis no larger than a host's device count stays inside a host).

    Args:
      config: The mesh shape (default: every device on ``data``).
      devices: Devices to use (default: ``jax.devices()``, every process's devices).

    Returns:
      The mesh.

    Raises:
      MeshError: the shape does not match the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    shape = (config or MeshConfig()).resolve(len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape.data, shape.model), AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """``{"data": D, "model": M}`` of a jaxquant mesh (a one-axis ``data`` mesh: M = 1)."""
    return {name: int(mesh.shape.get(name, 1)) for name in AXES}


# ----------------------------------------------------------------------------------------
# Partition rules.


def _data_fields(w: QuantizedWeight) -> list[str]:
    """The pytree children of a format, in ``register_dataclass`` order."""
    return [f.name for f in dataclasses.fields(w) if f.metadata.get("static") is not True]


def _build(w: QuantizedWeight, specs: Mapping[str, Any], mesh: Mesh) -> Any:
    """``w``'s pytree with every array leaf replaced by a NamedSharding.

    ``specs`` maps each data field to a PartitionSpec (applied to every array of the
    field) or to an already built sharding subtree (nested formats).
    """
    children = []
    for name in _data_fields(w):
        value, spec = getattr(w, name), specs[name]
        if isinstance(spec, PartitionSpec):
            spec = jax.tree.map(lambda _, s=spec: NamedSharding(mesh, s), value)
        children.append(spec)
    return jax.tree.unflatten(jax.tree.structure(w), jax.tree.leaves(children))


def _splits_words(k: int, m: int) -> bool:
    """Whether ``k`` input channels split over ``m`` devices at whole words of every plane."""
    return k % m == 0 and (k // m) % _WORD_CODES == 0


def _format_layout(w: Any, axis: str, mesh: Mesh) -> tuple[Any, str]:
    """(sharding subtree, label) of a quantized weight split along ``axis``."""
    m = mesh_shape(mesh)[MODEL]
    n, k = w.shape
    rows, cols, rep = PartitionSpec(MODEL, None), PartitionSpec(None, MODEL), PartitionSpec()
    if isinstance(w, OutlierWeight):
        base, label = _format_layout(w.base, axis, mesh)
        return (_build(w, {"base": base, "index": rep, "values": rep}, mesh),
                f"{label}; outliers replicated")
    if axis == "row":
        if isinstance(w, (UniformWeight, CodebookWeight)) and _splits_words(k, m):
            if isinstance(w, CodebookWeight):
                return _build(w, {"planes": cols, "codebook": rows}, mesh), "row"
            groups = num_groups(k, w.group_size)
            split = groups % m == 0 and (k // m) % w.group_size == 0
            scale = cols if split else rep
            return (_build(w, {"planes": cols, "scales": scale, "zeros": scale}, mesh),
                    "row" if split else "row; scales replicated")
        layout, label = _format_layout(w, "column", mesh)
        return layout, f"{label} (fallback: input axis does not split)"
    if n % m:
        return jax.tree.map(lambda _: NamedSharding(mesh, rep), w), "replicated (fallback)"
    if isinstance(w, UniformWeight):
        return _build(w, {"planes": rows, "scales": rows, "zeros": rows}, mesh), "column"
    if isinstance(w, CodebookWeight):
        return _build(w, {"planes": rows, "codebook": rep}, mesh), "column"
    if isinstance(w, MixedWeight):
        parts = [_format_layout(p, "column", mesh)[0] for p in w.parts]
        return _build(w, {"parts": tuple(parts), "perm": rep}, mesh), "column"
    return jax.tree.map(lambda _: NamedSharding(mesh, rep), w), "replicated (unknown format)"


def _leaf_layout(path: str, leaf: Any, mesh: Mesh) -> tuple[Any, str]:
    """(sharding subtree, label) of one parameter."""
    m = mesh_shape(mesh)[MODEL]
    replicated = NamedSharding(mesh, PartitionSpec())
    axis = "column" if _COLUMN.fullmatch(path) else "row" if _ROW.fullmatch(path) else None
    if isinstance(leaf, QuantizedWeight):
        if axis is None:
            return jax.tree.map(lambda _: replicated, leaf), "replicated"
        return _format_layout(leaf, axis, mesh)
    shape = tuple(getattr(leaf, "shape", ()))
    if m > 1 and len(shape) == 2 and axis is not None:
        n, k = shape
        if axis == "row" and k % m == 0:
            return NamedSharding(mesh, PartitionSpec(None, MODEL)), "row"
        if n % m == 0:
            label = "column" if axis == "column" else "column (fallback)"
            return NamedSharding(mesh, PartitionSpec(MODEL, None)), label
        return replicated, "replicated (fallback)"
    if m > 1 and len(shape) == 1 and _COLUMN_BIAS.fullmatch(path) and shape[0] % m == 0:
        return NamedSharding(mesh, PartitionSpec(MODEL)), "column"
    return jax.tree.map(lambda _: replicated, leaf), "replicated"


def _map_params(fn: Any, params: Mapping[Any, Any]) -> Any:
    """``fn(path, leaf)`` over the parameters (a quantized weight is one leaf)."""
    return unflatten({path: fn(path, leaf) for path, leaf in flatten(params).items()})


def param_shardings(params: Mapping[Any, Any], mesh: Mesh) -> dict[Any, Any]:
    """A NamedSharding for every array leaf of ``params`` (same tree structure).

    Args:
      params: Parameter pytree (float arrays or :mod:`jaxquant.formats` weights).
      mesh: A mesh from :func:`make_mesh` (a mesh without a ``model`` axis replicates).

    Returns:
      The tree of shardings, for :func:`jax.device_put` or ``jit``'s ``in_shardings``.
    """
    if MODEL not in mesh.axis_names:
        replicated = NamedSharding(mesh, PartitionSpec())
        return jax.tree.map(lambda _: replicated, dict(params))
    return _map_params(lambda path, leaf: _leaf_layout(path, leaf, mesh)[0], params)


def describe_layout(params: Mapping[Any, Any], mesh: Mesh) -> dict[str, str]:
    """How each parameter is laid out on ``mesh``: ``"column"``, ``"row"``,
    ``"replicated"``, with the fallbacks taken (see the module docstring)."""
    return {path: _leaf_layout(path, leaf, mesh)[1] for path, leaf in flatten(params).items()}


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` placed with ``sharding``; with several processes each process transfers only
    the pieces its own devices hold (every process passes the same ``x``)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: Mapping[Any, Any], mesh: Mesh) -> dict[Any, Any]:
    """``params`` placed on ``mesh`` by :func:`param_shardings`.

    Args:
      params: Parameter pytree (host NumPy or device arrays; quantized formats too).
      mesh: The mesh.

    Returns:
      The same tree of :class:`jax.Array` placed on the mesh.
    """
    shardings = param_shardings(params, mesh)
    return jax.tree.map(put, dict(params), shardings)
