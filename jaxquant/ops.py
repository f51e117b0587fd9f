"""The matmul entry point every linear layer goes through.

``linear(x, w, bias)`` computes ``y = x @ w.T + bias`` with ``w`` stored
``[out_features, in_features]`` (the Hugging Face layout; quantization groups run
along the contiguous input axis). A plain array goes through ``jnp.einsum``; any
other weight type (the quantized formats of later modules) is routed to the
implementation registered for its type with :func:`register_linear`, which is
where Pallas kernels plug in. ``embedding_lookup`` is the same for token
embeddings.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

LinearImpl = Callable[[jax.Array, Any], jax.Array]
EmbedImpl = Callable[[Any, jax.Array, Any], jax.Array]

_LINEAR: dict[type, LinearImpl] = {}
_EMBED: dict[type, EmbedImpl] = {}


_CAPTURE: contextvars.ContextVar[tuple[int, bool] | None] = contextvars.ContextVar(
    "jaxquant_capture_inputs", default=None)


@contextlib.contextmanager
def capture_inputs(sample_stride: int = 0, *, gram: bool = True) -> Iterator[None]:
    """While tracing inside this context, linear layers record statistics of their inputs.

    A trace-time switch (it changes what is traced, not a runtime flag): calibration
    traces blocks inside it and reads these ``nnx.Intermediate`` values per layer:
    ``input_gram`` (``X^T X``, float32; only with ``gram``), ``input_absmax``
    (``max |X_j|`` per input channel) and, when ``sample_stride > 0``, ``input_sample``
    (every ``sample_stride``-th token row of ``X``).
    """
    token = _CAPTURE.set((int(sample_stride), bool(gram)))
    try:
        yield
    finally:
        _CAPTURE.reset(token)


def capturing_inputs() -> bool:
    """True inside :func:`capture_inputs`."""
    return _CAPTURE.get() is not None


def capture_sample_stride() -> int:
    """Token stride of the captured input sample (0: no sample)."""
    state = _CAPTURE.get()
    return state[0] if state else 0


def capture_gram() -> bool:
    """Whether the captured statistics include the Gram matrix ``X^T X``."""
    state = _CAPTURE.get()
    return bool(state and state[1])


def register_linear(weight_type: type, impl: LinearImpl) -> None:
    """Routes ``linear(x, w)`` for weights of ``weight_type`` to ``impl(x, w)``."""
    _LINEAR[weight_type] = impl


def register_kernel(weight_type: type, matmul: Callable[..., jax.Array], *,
                    platform: str) -> None:
    """Routes ``linear(x, w)`` for a kernel-layout ``weight_type`` to a Pallas kernel,
    ``matmul(x, w, interpret=...)``: compiled on ``platform`` (``"gpu"``, ``"tpu"``), run
    in the Pallas interpreter elsewhere (weights prepared for that platform, as in tests)."""
    register_linear(weight_type, lambda x, w: matmul(
        x, w, interpret=jax.default_backend() != platform))


def register_embedding(weight_type: type, impl: EmbedImpl) -> None:
    """Routes ``embedding_lookup(w, ids, dtype)`` for ``weight_type`` to ``impl``."""
    _EMBED[weight_type] = impl


def _precision(dtype: Any) -> jax.lax.Precision:
    # float32 matmuls must be exact: XLA's default allows bf16 passes on GPU/TPU.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _act_quant_linear(x: jax.Array, w: Any, act: Any) -> jax.Array:
    """``Q(x) @ w.T`` with ``x`` quantized per token (:mod:`jaxquant.algorithms.act_quant`).

    An integer matmul when both sides allow it: symmetric activation codes (int8) times a
    weight whose ``integer_codes()`` gives symmetric per-output-channel int8 codes (any
    symmetric per-channel uniform weight of up to 8 bits), accumulated exactly in int32.
    Otherwise the activations are quantized and dequantized (emulated) and the matmul
    runs in ``x``'s dtype: every 4-bit (W4A4) product on hardware without an int4 matmul
    and every grouped or codebook weight takes this path.
    """
    from jaxquant.algorithms import act_quant  # pure math; imported lazily (no cycle)

    ints = w.integer_codes() if hasattr(w, "integer_codes") else None
    if ints is not None and act.symmetric:
        codes, scale, _ = act_quant.quantize_activations(x, act)
        return act_quant.int8_matmul(codes, scale, *ints).astype(x.dtype)
    return linear(act_quant.fake_quant_activations(x, act), w)


def linear(x: jax.Array, w: Any, bias: jax.Array | None = None, *, act: Any = None
           ) -> jax.Array:
    """``x @ w.T + bias`` for ``w`` of shape ``[out, in]`` (array or quantized format).

    Args:
      x: Activations ``[..., in]``; the result has x's dtype.
      w: Weight ``[out, in]``: an array, or a type registered with ``register_linear``.
      bias: Optional ``[out]``.
      act: Optional :class:`~jaxquant.algorithms.act_quant.ActQuantConfig`: quantize
        ``x`` per token first (W8A8 / W4A4; see :func:`_act_quant_linear`).
    """
    impl = _LINEAR.get(type(w))
    if act is not None:
        y = _act_quant_linear(x, w, act)
    elif impl is not None:
        y = impl(x, w)
    else:
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), precision=_precision(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def embedding_lookup(table: Any, ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows ``table[ids]`` as ``dtype`` (array or registered quantized table)."""
    impl = _EMBED.get(type(table))
    if impl is not None:
        return impl(table, ids, dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)
