"""The common interface of quantized weight formats.

A format is a frozen dataclass registered as a JAX pytree (its arrays are leaves,
its static description is metadata), so it passes through ``jax.jit``,
``jax.device_put`` with shardings, and Orbax unchanged. Each format provides

* ``dequantize(dtype)``: the plain-jnp reference, a float ``[out, in]`` matrix;
* ``nbytes``: the exact bytes of every array it holds (codes, scales, zeros,
  codebooks, permutations, outliers), so ``bits_per_weight`` is an exact account;
* ``summary()``: a one-line description for humans;
* ``layout()`` / :func:`from_layout`: a JSON description from which a checkpoint's
  restored arrays are rebuilt into the format.

Formats register their matmul with :func:`jaxquant.ops.register_linear`; the jnp
path dequantizes one layer at a time inside ``jit``, and Pallas kernels replace it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import ops

_FORMATS: dict[str, type[QuantizedWeight]] = {}


def register_format(cls: type[QuantizedWeight]) -> type[QuantizedWeight]:
    """Class decorator: registers a format as a pytree, a layout name and a linear impl."""
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if f.metadata.get("static") is not True]
    meta = [f.name for f in fields if f.metadata.get("static") is True]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    _FORMATS[cls.NAME] = cls
    ops.register_linear(cls, lambda x, w: w.linear(x))
    ops.register_embedding(cls, lambda w, ids, dtype: w.embed(ids, dtype))
    return cls


def static(**kwargs: Any) -> Any:
    """A dataclass field that is pytree metadata (hashed into jit's cache key)."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def tree_nbytes(x: Any) -> int:
    """Exact bytes of all arrays in a pytree."""
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(x))


class QuantizedWeight:
    """Base class of quantized ``[out_features, in_features]`` weights."""

    NAME: ClassVar[str] = ""
    shape: tuple[int, int]

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The float ``[out, in]`` matrix this weight represents (jnp reference)."""
        raise NotImplementedError

    def linear(self, x: jax.Array) -> jax.Array:
        """``x @ W^T`` (jnp path: dequantize this one layer, then matmul)."""
        return ops.linear(x, self.dequantize(x.dtype))

    def integer_codes(self) -> tuple[jax.Array, jax.Array] | None:
        """``(int8 codes [out, in], float32 scale [out])`` with ``W = scale * codes``.

        Only weights that are exactly such a product (symmetric, one scale per output
        channel) return it; they take the integer matmul of W8A8 / W4A8. Others: None.
        """
        return None

    def embed(self, ids: jax.Array, dtype: Any) -> jax.Array:
        """Rows ``W[ids]`` (for quantized embedding tables)."""
        return jnp.take(self.dequantize(dtype), ids, axis=0)

    @property
    def nbytes(self) -> int:
        """Exact bytes of all arrays held."""
        return tree_nbytes(self)

    @property
    def num_weights(self) -> int:
        """Number of weights represented."""
        return int(self.shape[0]) * int(self.shape[1])

    @property
    def bits_per_weight(self) -> float:
        """Storage account: all bits held divided by the number of weights."""
        return 8.0 * self.nbytes / self.num_weights

    @property
    def dtype(self) -> Any:
        """Float dtype of the dequantized weight's parameters (scales, codebooks)."""
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return 2

    def summary(self) -> str:
        """One line for humans."""
        raise NotImplementedError

    def layout(self) -> dict[str, Any]:
        """JSON description of the structure (format names and static fields, recursively)."""
        out: dict[str, Any] = {"format": self.NAME}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("static") is True:
                out[f.name] = list(value) if isinstance(value, tuple) else value
            elif isinstance(value, QuantizedWeight):
                out[f.name] = value.layout()
            elif isinstance(value, tuple) and value and isinstance(value[0], QuantizedWeight):
                out[f.name] = [v.layout() for v in value]
        return out


def _rebuild(value: Any, spec: Any) -> Any:
    if isinstance(spec, Mapping) and "format" in spec:
        return from_layout(value, spec)
    if isinstance(spec, list):
        return tuple(_rebuild(v, s) for v, s in zip(_as_seq(value), spec, strict=True))
    return value


def _as_seq(value: Any) -> list[Any]:
    if isinstance(value, Mapping):  # Orbax restores sequences as {"0": .., "1": ..}
        return [value[k] for k in sorted(value, key=int)]
    return list(value)


def from_layout(tree: Mapping[str, Any], spec: Mapping[str, Any]) -> QuantizedWeight:
    """Rebuilds a format from its restored arrays (a dict by field) and its ``layout()``."""
    cls = _FORMATS.get(spec.get("format", ""))
    if cls is None:
        raise ValueError(f"unknown quantized format {spec.get('format')!r}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("static") is True:
            value = spec[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        elif f.name in spec:
            kwargs[f.name] = _rebuild(tree[f.name], spec[f.name])
        else:
            value = tree.get(f.name) if isinstance(tree, Mapping) else None
            if isinstance(value, (Mapping, list, tuple)):
                value = tuple(_as_seq(value))
            kwargs[f.name] = value
    return cls(**kwargs)


def is_quantized(x: Any) -> bool:
    """True for any quantized weight format."""
    return isinstance(x, QuantizedWeight)
