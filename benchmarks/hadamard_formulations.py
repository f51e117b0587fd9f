"""How to write the online Hadamard for XLA on a GPU: formulations of one Kronecker factor.

``hadamard_transform`` applies ``H_K`` (K = 172 for 11008, 64 for 4096) on a middle axis
of ``x`` reshaped to ``[..., K, P]`` and ``H_P`` on the last. The last-axis factor is a
plain GEMM; the middle-axis one can be written three ways:

* ``A``: ``einsum("...kp,jk->...jp", x, H)`` (``x`` on the left);
* ``B``: swap the two axes, a last-axis GEMM, swap back;
* ``C``: ``einsum("jk,...kp->...jp", H, x)`` (``H`` on the left; what
  :func:`jaxquant.transforms.hadamard.hadamard_transform` uses);

each with the middle factor first or last. Printed per shape: CUPTI device time
(median of 5), the kernels XLA launched, and the relative error against the float32
transform; ``old``: the transform before the per-factor rewrite (``x`` on the left,
a separate normalization pass).

    python benchmarks/hadamard_formulations.py [--out benchmarks/results/gpu]

Writes ``hadamard_formulations_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import environment
from jaxquant.transforms.hadamard import _base_matrix, hadamard_transform

ROOT = Path(__file__).resolve().parents[1]
F32 = jnp.float32
SHAPES = (((2048, 11008), 172, 64), ((16, 11008), 172, 64), ((1, 11008), 172, 64),
          ((2048, 4096), 64, 64), ((16, 4096), 64, 64), ((1, 4096), 64, 64))


def _mid(x: jax.Array, h, variant: str) -> jax.Array:
    hm = jnp.asarray(h, x.dtype)
    if variant == "A":
        return jnp.einsum("...kp,jk->...jp", x, hm, preferred_element_type=F32)
    if variant == "B":
        y = jnp.einsum("...pk,jk->...pj", jnp.swapaxes(x, -1, -2), hm,
                       preferred_element_type=F32)
        return jnp.swapaxes(y, -1, -2)
    return jnp.einsum("jk,...kp->...jp", hm, x, preferred_element_type=F32)


def _last(x: jax.Array, h) -> jax.Array:
    return jnp.einsum("...p,jp->...j", x, jnp.asarray(h, x.dtype), preferred_element_type=F32)


def _old(x: jax.Array, k: int, p: int) -> jax.Array:
    """Before: ``x`` on the left of every factor, one normalization pass at the end."""
    y = x.reshape(*x.shape[:-1], k, p)
    y = jnp.moveaxis(jnp.tensordot(y, jnp.asarray(_base_matrix(k), x.dtype), ((y.ndim - 2,),
                                   (1,)), preferred_element_type=F32), -1, -2).astype(x.dtype)
    y = jnp.tensordot(y, jnp.asarray(_base_matrix(p), x.dtype), ((y.ndim - 1,), (1,)),
                      preferred_element_type=F32).astype(x.dtype)
    return (y.reshape(x.shape).astype(F32) / math.sqrt(k * p)).astype(x.dtype)


def _variant(x: jax.Array, k: int, p: int, variant: str, mid_first: bool) -> jax.Array:
    y = x.reshape(*x.shape[:-1], k, p)
    steps = [lambda y: _mid(y, _base_matrix(k), variant) / math.sqrt(k),
             lambda y: _last(y, _base_matrix(p)) / math.sqrt(p)]
    for step in steps if mid_first else steps[::-1]:
        y = step(y).astype(x.dtype)
    return y.reshape(x.shape)


def _profile(f, x: jax.Array) -> tuple[float, list[str]]:
    from jax.experimental.mosaic.gpu import profiler

    jf = jax.jit(f)
    _, kernels = profiler.measure(jf, aggregate=False)(x)
    times = [profiler.measure(jf)(x)[1] for _ in range(5)]
    return statistics.median(times) * 1e3, [name for name, _ in kernels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    args = parser.parse_args()
    rows = []
    for shape, k, p in SHAPES:
        x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
        ref = hadamard_transform(x.astype(F32))
        cases = {"old": lambda x, k=k, p=p: _old(x, k, p)}
        for v in "ABC":
            for mid_first in (True, False):
                cases[f"{v} {'mid' if mid_first else 'last'} first"] = (
                    lambda x, v=v, m=mid_first, k=k, p=p: _variant(x, k, p, v, m))
        for name, f in cases.items():
            err = float(jnp.linalg.norm(f(x).astype(F32) - ref) / jnp.linalg.norm(ref))
            us, kernels = _profile(f, x)
            rows.append({"shape": list(shape), "variant": name, "us": us, "rel_err": err,
                         "kernels": kernels})
            print(rows[-1], flush=True)
    tag = jax.devices()[0].device_kind.lower().replace(" ", "_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"hadamard_formulations_{tag}.json").write_text(
        json.dumps({**environment(), "rows": rows}, indent=2) + "\n")
    md = [f"# Hadamard formulations on {jax.devices()[0].device_kind} (JAX {jax.__version__})",
          "", "CUPTI device time, median of 5; bf16 input, float32 accumulation.", "",
          "| shape | variant | us | kernels | rel. err |", "|---|---|---|---|---|"]
    md += [f"| {'x'.join(map(str, r['shape']))} | {r['variant']} | {r['us']:.1f} | "
           f"{len(r['kernels'])} | {r['rel_err']:.1e} |" for r in rows]
    (out / f"hadamard_formulations_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
