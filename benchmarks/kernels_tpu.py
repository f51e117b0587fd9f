"""TPU dequant-matmul kernels against XLA: Llama-2-7B shapes, every format, M from 1 to 2048.

Runs only where a TPU is present (it says so and exits otherwise; the kernels' numerics
are checked in CI by the Pallas TPU interpreter). For each weight shape (4096x4096,
11008x4096, 4096x11008: ``[out, in]``), format (uniform 4/3/2-bit g128, codebook
4/3/2-bit, W8A8 int8) and M in {1, 4, 16, 64, 512, 2048}, it records the median time
(warm-up, ``block_until_ready``, 20 runs), the effective bandwidth (bytes of weights,
scales/tables, activations and output moved / time), its fraction of the copy
bandwidth measured in the same run, and the speedup over XLA's bf16 matmul and over a
jnp dequantize-then-matmul of the same weight (a qwix int4 column is not measured yet).
The device, JAX version, copy bandwidth and bf16 matmul rate
go into the same JSON (``benchmarks/results/tpu/kernels_tpu_<device>.json``) and a
markdown table beside it.

    python benchmarks/kernels_tpu.py [--m 1,16,512] [--formats uniform4,codebook3]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.rtn import rtn
from jaxquant.formats import CodebookWeight
from pallas_kernels import util
from pallas_kernels.tpu import codebook as tc
from pallas_kernels.tpu import common
from pallas_kernels.tpu import int8 as ti
from pallas_kernels.tpu import uniform as tu

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
FORMATS = ("uniform4", "uniform3", "uniform2", "codebook4", "codebook3", "codebook2", "int8")


def nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def device_facts() -> dict:
    """Copy bandwidth (read + write of 1 GiB) and bf16 8192^3 matmul rate, this run."""
    a = jnp.ones((2**28,), jnp.float32)
    copy = jax.jit(lambda v: v + 1)
    t = util.wall_us(copy, a, runs=10) * 1e-6
    x = jnp.ones((8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    tm = util.wall_us(mm, x, x, runs=10) * 1e-6
    return {"copy_gbps": 2 * a.size * 4 / t / 1e9, "bf16_tflops": 2 * 8192**3 / tm / 1e12}


def build(fmt: str, wf: jax.Array, rng: np.random.Generator) -> tuple[Any, Any, Any]:
    """``(kernel fn, kernel weight, jnp dequantize-then-matmul fn)``."""
    n, k = wf.shape
    if fmt.startswith("uniform"):
        w = rtn(wf, bits=int(fmt[-1]), group_size=128, symmetric=False)
        return tu.uniform_matmul, tu.relayout(w), lambda x, q=w: x @ q.dequantize(x.dtype).T
    if fmt.startswith("codebook"):
        bits = int(fmt[-1])
        w = CodebookWeight.from_indices(
            jnp.asarray(rng.integers(0, 2**bits, (n, k))),
            jnp.asarray(np.sort(rng.normal(size=(k, 2**bits)), 1), jnp.float16), bits=bits)
        return tc.codebook_matmul, tc.relayout(w), lambda x, q=w: x @ q.dequantize(x.dtype).T
    wq = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    ws = jnp.asarray(rng.uniform(0.01, 0.02, n), jnp.float32)

    def kernel(x: jax.Array, w: Any) -> jax.Array:
        codes = jnp.clip(jnp.round(x.astype(jnp.float32) * 50), -127, 127).astype(jnp.int8)
        return ti.int8_matmul(codes, jnp.full((*x.shape[:-1], 1), 0.02), *w)

    return kernel, (wq, ws), lambda x: x @ (wq.astype(x.dtype) * ws[:, None].astype(x.dtype)).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,4,16,64,512,2048")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tpu"))
    args = parser.parse_args()
    gen = common.tpu_generation()
    if gen is None:
        print("kernels_tpu: no TPU here (the kernels are checked in CI by the Pallas TPU "
              "interpreter; timings need a TPU)")
        return
    dev = jax.devices()[0]
    facts = device_facts()
    rng = np.random.default_rng(0)
    rows = []
    for n, k in SHAPES:
        wf = jnp.asarray(rng.normal(size=(n, k)).astype(np.float32))
        wb = wf.astype(jnp.bfloat16)
        for fmt in args.formats.split(","):
            fn, kw, deq = build(fmt, wf, rng)
            kernel = jax.jit(fn)
            for m in (int(v) for v in args.m.split(",")):
                x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
                t = util.wall_us(kernel, x, kw, runs=20)
                t_bf16 = util.wall_us(jax.jit(lambda a, b: a @ b.T), x, wb, runs=20)
                t_deq = util.wall_us(jax.jit(deq), x, runs=20)
                moved = nbytes(kw) + x.size * 2 + m * n * 2
                row = {"shape": [n, k], "format": fmt, "m": m, "us": t, "bf16_us": t_bf16,
                       "dequant_jnp_us": t_deq, "gbps": moved / t / 1e3,
                       "copy_fraction": moved / t / 1e3 / facts["copy_gbps"],
                       "speedup_bf16": t_bf16 / t, "speedup_dequant_jnp": t_deq / t}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "_", dev.device_kind.lower()).strip("_")
    result = {"device": dev.device_kind, "generation": gen, "jax": jax.__version__,
              **facts, "rows": rows}
    (out / f"kernels_tpu_{name}.json").write_text(json.dumps(result, indent=1))
    md = [f"# TPU kernels on {dev.device_kind} (JAX {jax.__version__})", "",
          f"Copy bandwidth {facts['copy_gbps']:.0f} GB/s, bf16 matmul "
          f"{facts['bf16_tflops']:.0f} TFLOP/s (this run).", "",
          "| shape | format | M | us | GB/s | of copy bw | x bf16 | x jnp dequant |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['shape'][0]}x{r['shape'][1]} | {r['format']} | {r['m']} | {r['us']:.1f} | "
           f"{r['gbps']:.0f} | {100 * r['copy_fraction']:.0f}% | {r['speedup_bf16']:.2f} | "
           f"{r['speedup_dequant_jnp']:.2f} |" for r in rows]
    (out / f"kernels_tpu_{name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out}/kernels_tpu_{name}.{{json,md}}")


if __name__ == "__main__":
    main()
