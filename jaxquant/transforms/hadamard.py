r"""Hadamard matrices of practical orders and a fast, jit-able Hadamard transform.

A Hadamard matrix of order ``n`` is an ``n x n`` matrix ``H`` with entries ``±1``
and ``H H^T = n I``, so ``H / sqrt(n)`` is orthogonal. QuaRot-style quantization
rotates activations and weights by such matrices (with random signs) to spread
outliers across channels; since the rotation is orthogonal, ``x W^T`` is unchanged
when both sides are rotated.

Layer widths of real models are rarely powers of two (SmolLM2 hidden 576 = 36 * 16,
Llama-2-7B FFN 11008 = 172 * 64, Qwen2.5 FFN 4864 = 76 * 64), so this module
supports every order ``n = K * 2^m`` where ``K`` is a *base order* built by one of:

* Sylvester (1867): ``H_{2^m}``, with ``H_1 = [1]`` and
  ``H_{2P} = [[H_P, H_P], [H_P, -H_P]] = H_2 ⊗ H_P``, i.e.
  ``H_{2^m}[i, j] = (-1)^popcount(i & j)`` (symmetric).
* Paley (1933), construction I: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``,
  ``H = I + S`` with the skew conference matrix ``S = [[0, 1^T], [-1, Q]]``;
  construction II: order ``2 (q + 1)`` for a prime power ``q ≡ 1 (mod 4)``,
  ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]`` with the symmetric
  conference matrix ``C = [[0, 1^T], [1, Q]]``. ``Q[a, b] = χ(a - b)`` is the
  Jacobsthal matrix of the quadratic character ``χ`` of ``GF(q)``; for ``q = p^k``
  the field is ``GF(p)[t] / (f)`` with an irreducible ``f`` found by search.
* Williamson (1944) / Goethals-Seidel (1970): order ``4 w`` from four circulant
  ``±1`` matrices ``A, B, C, D`` of order ``w`` with ``A A^T + B B^T + C C^T + D D^T
  = 4 w I``, plugged into the Goethals-Seidel array (which needs no symmetry).
  Tabulated first rows are used for ``w`` in 23, 29, 39, 43 (orders 92, 116, 156,
  172, which Paley cannot reach); see ``_WILLIAMSON_ROWS`` for the source.
* Kronecker products: ``H_a ⊗ H_b`` has order ``a b``.

Every base matrix is checked (``H H^T = K I`` in exact integer arithmetic) when it is
built, and cached. Up to 256, the only multiples of 4 without a matrix here are 188
and 236 (they would need constructions not implemented here, e.g. Goethals-Seidel
difference families); such sizes, and orders that are not ``1, 2`` or multiples of 4,
can use the block-diagonal fallback.

Conventions (used by every function here):

* ``hadamard_factorization(n)`` picks ``n = K * 2^m`` with the *largest* ``m`` whose
  cofactor ``K`` is constructible (576 -> 36 * 16, 11008 -> 172 * 64,
  4864 -> 76 * 64, 40 -> 20 * 2, 2^m -> 1 * 2^m).
* ``hadamard_matrix(n) = H_K ⊗ H_{2^m}`` (numpy ``np.kron`` order: index
  ``i = a * 2^m + b`` with ``a < K``, ``b < 2^m``).
* ``hadamard_transform(x) = x @ hadamard_matrix(n).T / sqrt(n)`` along ``axis``
  (``normalize=False`` drops the ``1 / sqrt(n)``). ``H_K`` need not be symmetric,
  so the transpose matters; the inverse of the normalized transform is
  ``x @ hadamard_matrix(n) / sqrt(n)``.
* Block-diagonal fallback: ``I_{n / b} ⊗ hadamard_matrix(b)`` for the largest
  supported ``b`` dividing ``n``, normalized by ``1 / sqrt(b)``.

Example::

  >>> import jax, jax.numpy as jnp
  >>> from jaxquant.transforms import hadamard
  >>> x = jnp.ones((4, 576))
  >>> y = hadamard.hadamard_transform(x)          # x @ H^T / 24, H = H_36 ⊗ H_16
  >>> q = hadamard.random_hadamard_matrix(576, jax.random.key(0))
"""

from __future__ import annotations

import functools
import math
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MAX_BASE_ORDER",
    "HadamardFactorization",
    "base_orders",
    "hadamard_factorization",
    "hadamard_matrix",
    "hadamard_transform",
    "random_hadamard_matrix",
    "random_sign_hadamard_transform",
    "random_signs",
    "supported_orders",
]

MAX_BASE_ORDER = 4096
"""Largest base order ``K`` that is constructed (the dense ``K x K`` part of the
transform costs ``K`` multiply-adds per element; a 4096^2 int8 matrix is 16 MiB)."""

_VERIFY_LIMIT = 1024  # Base matrices up to this order are checked when built.

# First rows of four circulant ±1 matrices A, B, C, D of order w with
# A A^T + B B^T + C C^T + D D^T = 4 w I (Williamson quadruples: symmetric circulants).
# Source: the table in SageMath, sage.combinat.matrices.hadamard_matrix,
# williamson_type_quadruples_smallcases (data only), which attributes w = 23, 29, 43
# to M. Hall Jr., "Combinatorial Theory", 2nd ed., Wiley, 1983, and w = 39 to
# S. London, "Constructing New Turyn Type Sequences, T-Sequences and Hadamard
# Matrices", PhD thesis, University of Illinois at Chicago, 2013. Each quadruple is
# verified by construction in _goethals_seidel (and in tests/test_hadamard.py).
_WILLIAMSON_ROWS: dict[int, tuple[str, str, str, str]] = {
    23: ("++---+---+-++-+---+---+",
         "+-++-++--++++++--++-++-",
         "+++---++-+-++-+-++---++",
         "+++-+++-+------+-+++-++"),
    29: ("+++---++--+-+----+-+--++---++",
         "+-+---++--+-++++++-+--++---+-",
         "++++-++-+---++++++---+-++-+++",
         "++--+--+-+++-++++-+++-+--+--+"),
    39: ("+++--+-+-----+--++----++--+-----+-+--++",
         "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++",
         "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+",
         "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+",
         "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}


# ----------------------------------------------------------------------------------
# Number theory and finite fields.
# ----------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k`` for a prime ``p``, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_rem(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of ``a`` modulo monic ``f`` over GF(p); coefficients low degree first."""
    a = list(a)
    while len(a) >= len(f):
        c = a[-1] % p
        if c:
            shift = len(a) - len(f)
            for i, fi in enumerate(f):
                a[shift + i] = (a[shift + i] - c * fi) % p
        a.pop()
    return a


def _monic_polys(degree: int, p: int):
    """All monic polynomials of ``degree`` over GF(p), low degree first."""
    for code in range(p**degree):
        coeffs = [(code // p**i) % p for i in range(degree)]
        yield [*coeffs, 1]


@functools.cache
def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree ``k`` over GF(p), by search."""
    for f in _monic_polys(k, p):
        if all(any(_poly_rem(f, g, p))
               for d in range(1, k // 2 + 1) for g in _monic_polys(d, p)):
            return tuple(f)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _field_digits(q: int, p: int, k: int) -> np.ndarray:
    """Base-``p`` digits ``[q, k]`` of the element codes ``0 .. q-1`` (polynomials)."""
    codes = np.arange(q)
    return np.stack([(codes // p**i) % p for i in range(k)], axis=1)


def _quadratic_character(q: int) -> np.ndarray:
    """``χ(a)`` for every element code ``a`` of GF(q): 0, +1 (square) or -1."""
    p, k = _prime_power(q)  # type: ignore[misc]
    if k == 1:
        squares = (np.arange(q) ** 2) % q
    else:
        f = list(_irreducible(p, k))
        digits = _field_digits(q, p, k)
        squares = np.empty(q, dtype=np.int64)
        for a in range(q):
            d = digits[a]
            prod = [0] * (2 * k - 1)
            for i in range(k):
                for j in range(k):
                    prod[i + j] += int(d[i]) * int(d[j])
            rem = _poly_rem([c % p for c in prod], f, p)
            squares[a] = sum(c * p**i for i, c in enumerate(rem))
    chi = -np.ones(q, dtype=np.int8)
    chi[squares] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix ``Q[a, b] = χ(a - b)`` of GF(q), rows and columns by code."""
    p, k = _prime_power(q)  # type: ignore[misc]
    chi = _quadratic_character(q)
    codes = np.arange(q)
    diff = np.zeros((q, q), dtype=np.int32)
    for i in range(k):
        digit = (codes // p**i) % p
        diff += ((digit[:, None] - digit[None, :]) % p) * p**i
    return chi[diff]


# ----------------------------------------------------------------------------------
# Constructions.
# ----------------------------------------------------------------------------------


def _sylvester(order: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int8)
    h2 = np.array([[1, 1], [1, -1]], dtype=np.int8)
    while h.shape[0] < order:
        h = np.kron(h2, h)
    return h


def _paley_1(q: int) -> np.ndarray:
    """Paley I, order ``q + 1`` (``q ≡ 3 mod 4``): ``H = I + [[0, 1^T], [-1, Q]]``."""
    h = np.empty((q + 1, q + 1), dtype=np.int8)
    h[0, :] = 1
    h[1:, 0] = -1
    h[1:, 1:] = _jacobsthal(q) + np.eye(q, dtype=np.int8)
    return h


def _paley_2(q: int) -> np.ndarray:
    """Paley II, order ``2 (q + 1)`` (``q ≡ 1 mod 4``)."""
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = np.array([[1, 1], [1, -1]], dtype=np.int8)
    b = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int8), b)


def _circulant(row: np.ndarray) -> np.ndarray:
    """Circulant matrix with first row ``row``: ``M[i, j] = row[(j - i) mod w]``."""
    w = row.shape[0]
    idx = (np.arange(w)[None, :] - np.arange(w)[:, None]) % w
    return row[idx]


def _goethals_seidel(w: int) -> np.ndarray:
    """Order ``4 w`` from tabulated circulants via the Goethals-Seidel array."""
    a, b, c, d = (_circulant(np.array([1 if s == "+" else -1 for s in row], np.int8))
                  for row in _WILLIAMSON_ROWS[w])
    r = np.eye(w, dtype=np.int8)[::-1]
    return np.block([
        [a, b @ r, c @ r, d @ r],
        [-b @ r, a, d.T @ r, -c.T @ r],
        [-c @ r, -d.T @ r, a, b.T @ r],
        [-d @ r, c.T @ r, -b.T @ r, a],
    ]).astype(np.int8)


@functools.cache
def _method(k: int) -> tuple[str, int] | None:
    """How to build a Hadamard matrix of order ``k`` (None if this module cannot)."""
    if k < 1 or k > MAX_BASE_ORDER or (k > 2 and k % 4):
        return None
    if k & (k - 1) == 0:
        return ("sylvester", k)
    pk = _prime_power(k - 1)
    if pk is not None and (k - 1) % 4 == 3:
        return ("paley1", k - 1)
    pk = _prime_power(k // 2 - 1)
    if pk is not None and (k // 2 - 1) % 4 == 1:
        return ("paley2", k // 2 - 1)
    if k // 4 in _WILLIAMSON_ROWS:
        return ("williamson", k // 4)
    for a in range(2, math.isqrt(k) + 1):
        if k % a == 0 and _method(a) is not None and _method(k // a) is not None:
            return ("kronecker", a)
    return None


@functools.cache
def _base_matrix(k: int) -> np.ndarray:
    """The (read-only, cached) Hadamard matrix of order ``k`` built by ``_method(k)``."""
    method = _method(k)
    if method is None:
        raise ValueError(f"no construction for a Hadamard matrix of order {k}")
    name, arg = method
    if name == "sylvester":
        h = _sylvester(arg)
    elif name == "paley1":
        h = _paley_1(arg)
    elif name == "paley2":
        h = _paley_2(arg)
    elif name == "williamson":
        h = _goethals_seidel(arg)
    else:
        h = np.kron(_base_matrix(arg), _base_matrix(k // arg))
    h = np.ascontiguousarray(h, dtype=np.int8)
    if k <= _VERIFY_LIMIT:
        gram = h.astype(np.float64) @ h.T.astype(np.float64)  # exact: |entries| < 2^53
        if h.shape != (k, k) or not np.array_equal(gram, k * np.eye(k)):
            raise AssertionError(f"construction {name} failed for order {k}")
    h.setflags(write=False)
    return h


# ----------------------------------------------------------------------------------
# Public API: matrices.
# ----------------------------------------------------------------------------------


class HadamardFactorization(NamedTuple):
    """How a transform of size ``n`` is computed: ``I_blocks ⊗ H_base ⊗ H_{power}``.

    Attributes:
      num_blocks: number of diagonal blocks (1 unless the block-diagonal fallback is
        used).
      base_order: ``K``, the order of the dense base matrix (1 for powers of two).
      power_of_two: ``2^m``, the order of the Sylvester factor (fast butterfly).
    """

    num_blocks: int
    base_order: int
    power_of_two: int

    @property
    def block_size(self) -> int:
        """Order of one diagonal block, ``base_order * power_of_two``."""
        return self.base_order * self.power_of_two

    @property
    def size(self) -> int:
        """The transformed size ``n``."""
        return self.num_blocks * self.block_size


def _split(n: int) -> tuple[int, int] | None:
    """``(K, 2^m)`` with ``n = K 2^m``, ``m`` largest such that ``K`` is constructible."""
    power = n & -n
    while power >= 1:
        if _method(n // power) is not None:
            return n // power, power
        power //= 2
    return None


def base_orders(limit: int) -> list[int]:
    """Base orders ``K <= limit`` used by :func:`hadamard_factorization`.

    These are the constructible orders ``K`` whose half is not constructible (plus
    ``K = 1``): every supported ``n`` is ``K * 2^m`` for exactly one of them.

    Args:
      limit: largest order to list.

    Returns:
      The sorted base orders, e.g. ``[1, 12, 20, 28, 36, 44, 52, 60, 68, 76, 84, 92, ...]``.
    """
    return [k for k in range(1, limit + 1)
            if _method(k) is not None and (k == 1 or _method(k // 2) is None or k % 2)]


def supported_orders(limit: int) -> list[int]:
    """All ``n <= limit`` for which :func:`hadamard_matrix` (and the exact fast
    transform) is available.

    Args:
      limit: largest order to list.

    Returns:
      The sorted orders: 1, 2 and the supported multiples of 4.
    """
    return [n for n in range(1, limit + 1) if _split(n) is not None]


def _unsupported_message(n: int) -> str:
    return (f"no Hadamard matrix of order {n} is available: supported sizes are "
            f"n = K * 2^m with K in base_orders() (up to 256: {base_orders(256)}); "
            f"the supported sizes up to {max(n, 256)} are supported_orders(). Pass "
            "allow_block_diagonal=True to use a block-diagonal Hadamard transform with "
            "the largest supported block size dividing n.")


def hadamard_factorization(n: int, *, allow_block_diagonal: bool = False
                           ) -> HadamardFactorization:
    """The factorization used for a transform of size ``n``.

    Without the fallback, ``n = K * 2^m`` with the largest ``m`` whose cofactor ``K``
    is a constructible order (576 -> ``(1, 36, 16)``, 11008 -> ``(1, 172, 64)``). With
    ``allow_block_diagonal=True`` and no such factorization, ``n`` is split into
    ``n / b`` equal blocks of the largest supported order ``b`` dividing ``n``.

    Args:
      n: transform size (positive).
      allow_block_diagonal: permit the block-diagonal fallback.

    Returns:
      A :class:`HadamardFactorization`.

    Raises:
      ValueError: ``n`` is unsupported (without the fallback), or ``n > 1`` has no
        supported divisor larger than 1 (e.g. odd ``n``).
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"Hadamard transform size must be positive, got {n}")
    split = _split(n)
    if split is not None:
        return HadamardFactorization(1, *split)
    if not allow_block_diagonal:
        raise ValueError(_unsupported_message(n))
    for b in sorted((d for d in range(2, n) if n % d == 0), reverse=True):
        split = _split(b)
        if split is not None:
            return HadamardFactorization(n // b, *split)
    raise ValueError(f"no block-diagonal Hadamard transform of size {n}: no supported "
                     f"Hadamard order > 1 divides {n} (orders are 1, 2 or multiples "
                     "of 4, see supported_orders())")


def hadamard_matrix(n: int, *, allow_block_diagonal: bool = False) -> np.ndarray:
    """A Hadamard matrix of order ``n``: ``±1`` entries (int8), ``H H^T = n I``.

    ``H = H_K ⊗ H_{2^m}`` (``np.kron`` order) with ``(K, 2^m)`` from
    :func:`hadamard_factorization`, so ``hadamard_transform(x) == x @ H.T / sqrt(n)``.
    Base matrices are cached; the returned array is a fresh copy. With
    ``allow_block_diagonal=True`` an unsupported ``n`` gives the block-diagonal
    ``I_{n/b} ⊗ H_b`` instead (then ``H H^T = b I``).

    Args:
      n: the order.
      allow_block_diagonal: permit the block-diagonal fallback.

    Returns:
      An ``[n, n]`` int8 numpy array.

    Raises:
      ValueError: see :func:`hadamard_factorization`.
    """
    f = hadamard_factorization(n, allow_block_diagonal=allow_block_diagonal)
    h = np.kron(_base_matrix(f.base_order), _base_matrix(f.power_of_two))
    if f.num_blocks > 1:
        h = np.kron(np.eye(f.num_blocks, dtype=np.int8), h)
    return h.astype(np.int8, copy=False)


# ----------------------------------------------------------------------------------
# Public API: transforms.
# ----------------------------------------------------------------------------------


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"hadamard_transform takes real inputs, got {dtype}")
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


#: Largest Sylvester factor applied as one dense matmul (tensor-core friendly).
_MAX_FACTOR = 128


def _pow2_factors(p: int) -> list[int]:
    """``p = 2^m`` as a product of powers of two of at most :data:`_MAX_FACTOR`, balanced."""
    m = p.bit_length() - 1
    stages = -(-m // (_MAX_FACTOR.bit_length() - 1)) if m else 0
    sizes, left = [], m
    for i in range(stages):
        a = -(-left // (stages - i))
        sizes.append(1 << a)
        left -= a
    return sizes


def _apply(y: jax.Array, h: np.ndarray, axis: int, scale: float) -> jax.Array:
    """``scale * y`` multiplied by ``h`` (``[k, k]``, ±1) along ``axis``:
    ``y_i <- scale * sum_j h_ij y_j``.

    One matmul per factor, the scale in its epilogue: on the last axis a plain
    ``[rows, k] @ [k, k]^T`` GEMM; on another axis ``h`` is the left operand
    (``h @ y[..., :, p]``), which XLA lowers to one GEMM fusion with no transpose of
    ``y`` (with ``y`` on the left it transposed ``y`` and the result: twice the
    kernels and 1.5-2x the time on an H200,
    ``benchmarks/results/gpu/hadamard_formulations_nvidia_h200.md``).
    float32/float64 inputs: at their precision (``HIGHEST``). bfloat16/float16 inputs:
    the ±1 entries are exact in them, products are accumulated in float32 (tensor
    cores), scaled in float32 and rounded once to the input dtype.
    """
    exact = y.dtype in (jnp.float32, jnp.float64)
    hm = jnp.asarray(h, dtype=y.dtype)
    kw = dict(precision=jax.lax.Precision.HIGHEST if exact else None,
              preferred_element_type=None if exact else jnp.float32)
    letters = "".join(c for c in string.ascii_letters if c not in "jk")[:y.ndim]
    src = letters.replace(letters[axis], "k")
    dst = letters.replace(letters[axis], "j")
    if axis % y.ndim == y.ndim - 1:
        out = jnp.einsum(f"{src},jk->{dst}", y, hm, **kw)
    else:
        out = jnp.einsum(f"jk,{src}->{dst}", hm, y, **kw)
    if scale != 1.0:
        out = out * jnp.asarray(scale, out.dtype)
    return out.astype(y.dtype)


def hadamard_transform(x: jax.Array, *, axis: int = -1, normalize: bool = True,
                       allow_block_diagonal: bool = False) -> jax.Array:
    """Fast Hadamard transform ``y = x H^T`` along ``axis``.

    With ``H = hadamard_matrix(n)`` and ``n = x.shape[axis]``, the result is
    ``x @ H.T`` (divided by ``sqrt(n)`` when ``normalize``), computed as
    ``Y = H_K X H_{2^m}^T`` on ``x`` reshaped to ``[..., K, 2^m]``: the ``2^m`` factor
    as dense Sylvester matmuls of at most 128 on the minor axes (one for ``2^m <=
    128``), then one dense ``K x K`` matmul; each factor's ``1/sqrt(order)`` is applied
    in its matmul's epilogue. With ``allow_block_diagonal=True`` and no exact
    factorization, each of the ``n / b`` contiguous blocks of size ``b`` is
    transformed by ``hadamard_matrix(b)`` and ``normalize`` divides by ``sqrt(b)``;
    the transform stays orthonormal. Jit-able and vmap-able.

    The normalized transform is orthogonal; its inverse is ``x @ H / sqrt(n)``
    (equal to the transform itself when ``H`` is symmetric, e.g. powers of two).

    Args:
      x: real array; floating dtypes are kept (float32 and float64 are computed at
        full precision; bfloat16/float16 accumulate each factor's products in float32
        and round to their dtype between factors), other dtypes return float32.
      axis: the axis to transform.
      normalize: divide by ``sqrt`` of the block order (orthonormal transform).
      allow_block_diagonal: permit the block-diagonal fallback for sizes without a
        Hadamard matrix.

    Returns:
      The transformed array, same shape as ``x``.

    Raises:
      ValueError: unsupported size, see :func:`hadamard_factorization`.
    """
    x = jnp.asarray(x)
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    cdtype = _compute_dtype(x.dtype)
    if out_dtype in (jnp.bfloat16, jnp.float16):
        cdtype = out_dtype
    if x.ndim == 0:
        raise ValueError("hadamard_transform needs an array with at least one axis")
    axis = axis % x.ndim
    n = x.shape[axis]
    f = hadamard_factorization(n, allow_block_diagonal=allow_block_diagonal)
    y = jnp.moveaxis(x, axis, -1).astype(cdtype)
    lead = y.shape[:-1]
    factors = _pow2_factors(f.power_of_two)
    y = y.reshape((*lead, f.num_blocks, f.base_order, *factors))
    first = len(lead) + 1  # the K axis
    # Each factor normalizes itself (1/sqrt of its order) in its matmul's epilogue, the
    # last (minor-axis) factor first: no separate scaling pass over the data.
    steps = [(_base_matrix(p), first + 1 + i) for i, p in enumerate(factors)][::-1]
    if f.base_order > 1:
        steps.append((_base_matrix(f.base_order), first))
    for h, ax in steps:
        y = _apply(y, h, ax, 1.0 / math.sqrt(h.shape[0]) if normalize else 1.0)
    y = y.reshape((*lead, n))
    return jnp.moveaxis(y, -1, axis).astype(out_dtype)


def random_signs(key: jax.Array, n: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """``n`` independent uniform ``±1`` values (``jax.random.rademacher``)."""
    return jax.random.rademacher(key, (n,), dtype=dtype)


def random_hadamard_matrix(n: int, key: jax.Array, *, allow_block_diagonal: bool = False
                           ) -> jax.Array:
    """Random orthogonal Hadamard rotation ``Q = H diag(s) / sqrt(n)`` (QuaRot style).

    ``H = hadamard_matrix(n)`` and ``s = random_signs(key, n)``. ``Q`` is orthogonal
    (``Q Q^T = Q^T Q = I``), so rotating activations and weights alike leaves a
    linear layer unchanged: ``(x Q)(W Q)^T = x W^T``. Applying ``x -> x Q^T``
    without forming ``Q`` is ``random_sign_hadamard_transform(x, s)``. With the
    block-diagonal fallback, ``H`` is block-diagonal and the scale is
    ``1 / sqrt(b)``.

    Args:
      n: the order.
      key: a JAX PRNG key.
      allow_block_diagonal: permit the block-diagonal fallback.

    Returns:
      ``[n, n]`` float32 orthogonal matrix.
    """
    f = hadamard_factorization(n, allow_block_diagonal=allow_block_diagonal)
    h = jnp.asarray(hadamard_matrix(n, allow_block_diagonal=allow_block_diagonal),
                    dtype=jnp.float32)
    s = random_signs(key, n)
    return h * s[None, :] / math.sqrt(f.block_size)


def random_sign_hadamard_transform(x: jax.Array, signs: jax.Array, *, axis: int = -1,
                                   allow_block_diagonal: bool = False) -> jax.Array:
    """``x -> (x * s) H^T / sqrt(n)`` along ``axis``, i.e. ``x @ Q.T``.

    With ``signs = random_signs(key, n)`` this equals
    ``x @ random_hadamard_matrix(n, key).T`` (up to float rounding), computed with the
    fast transform. It is orthogonal: the inverse is ``x -> (x @ H / sqrt(n)) * s``.

    Args:
      x: real array.
      signs: ``[n]`` array of ``±1``.
      axis: the axis to transform, of size ``n``.
      allow_block_diagonal: permit the block-diagonal fallback.

    Returns:
      The rotated array, dtype of ``x`` (float32 for non-floating ``x``).

    Raises:
      ValueError: ``signs`` does not have shape ``[n]``, or ``n`` is unsupported.
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("random_sign_hadamard_transform needs an array with an axis")
    axis = axis % x.ndim
    signs = jnp.asarray(signs)
    if signs.shape != (x.shape[axis],):
        raise ValueError(f"signs must have shape ({x.shape[axis]},) to match axis {axis} "
                         f"of x, got {signs.shape}")
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    signs = jnp.reshape(signs, shape)
    cdtype = _compute_dtype(x.dtype)
    xs = x.astype(cdtype) * signs.astype(cdtype)
    y = hadamard_transform(xs, axis=axis, normalize=True,
                           allow_block_diagonal=allow_block_diagonal)
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return y.astype(out_dtype)
