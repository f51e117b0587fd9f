"""What QuaRot's online Hadamards cost in a jitted forward (Llama-2-7B shapes, random weights).

The same bf16 weights run with ``ModelConfig.online_hadamard`` off and on (on: a
Hadamard of the down_proj input, 11008 = 172 x 64; of the o_proj input across all
heads, 4096; and of queries and keys over head_dim, 128). Timed with a warm-up call,
``block_until_ready`` and the median of ``--repeats`` calls, both variants in the same
run: a prefill forward (full sequences) and single-token decode steps with a KV cache.
Also the transform alone against the down_proj matmul it precedes.

    python benchmarks/hadamard_overhead.py [--layers 32] [--out benchmarks/results/gpu]

Writes ``hadamard_overhead_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.configs import llama2_7b
from benchmarks.timing import wall_us
from jaxquant.models.transformer import decode_step, forward, init_cache, init_params
from jaxquant.transforms.hadamard import hadamard_transform

ROOT = Path(__file__).resolve().parents[1]




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prefill", default="1x2048,8x512", help="BxT shapes of the forward")
    parser.add_argument("--decode", default="1,16", help="batch sizes of decode steps")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens when decoding")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    args = parser.parse_args()

    cfg = llama2_7b(args.layers)
    on = dataclasses.replace(cfg, online_hadamard=True)
    params = init_params(cfg, dtype=jnp.bfloat16)
    rows = []
    fwd = jax.jit(forward, static_argnums=1)
    for shape in args.prefill.split(","):
        b, t = (int(v) for v in shape.split("x"))
        tokens = jnp.zeros((b, t), jnp.int32) + jnp.arange(t, dtype=jnp.int32) % 31999
        base = wall_us(fwd, params, cfg, tokens, runs=args.repeats) / 1e6
        had = wall_us(fwd, params, on, tokens, runs=args.repeats) / 1e6
        rows.append({"case": f"prefill forward B={b} T={t}", "base_ms": 1e3 * base,
                     "online_ms": 1e3 * had, "overhead": had / base - 1})
        print(rows[-1], flush=True)
    step = jax.jit(decode_step, static_argnums=1, donate_argnums=3)
    for b in (int(v) for v in args.decode.split(",")):
        tok = jnp.ones((b, 1), jnp.int32)
        res = {}
        for name, c in (("base", cfg), ("online", on)):
            cache = init_cache(c, b, args.context + 64, jnp.bfloat16)
            cache["length"] = jnp.asarray(args.context, jnp.int32)
            times = []
            for i in range(args.repeats + 2):
                t0 = time.perf_counter()
                logits, cache = step(params, c, tok, cache)
                jax.block_until_ready(logits)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            res[name] = statistics.median(times)
        rows.append({"case": f"decode step B={b} (context {args.context})",
                     "base_ms": 1e3 * res["base"], "online_ms": 1e3 * res["online"],
                     "overhead": res["online"] / res["base"] - 1})
        print(rows[-1], flush=True)
    # The transform alone, against the down_proj matmul it precedes.
    x = jax.random.normal(jax.random.key(0), (2048, cfg.intermediate_size), jnp.bfloat16)
    w = params["layers"][0]["mlp"]["down_proj"]["weight"]
    t_had = wall_us(jax.jit(hadamard_transform), x, runs=args.repeats) / 1e6
    t_mm = wall_us(jax.jit(lambda a, b: a @ b.T), x, w, runs=args.repeats) / 1e6
    rows.append({"case": "2048 x 11008 bf16: Hadamard alone vs the down_proj matmul",
                 "base_ms": 1e3 * t_mm, "online_ms": 1e3 * (t_mm + t_had),
                 "overhead": t_had / t_mm})
    print(rows[-1], flush=True)
    dev = jax.devices()[0]
    meta = {"device": dev.device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__, "layers": args.layers, "repeats": args.repeats,
            "model": "Llama-2-7B shapes, random bf16 weights"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = dev.device_kind.lower().replace(" ", "_")
    (out / f"hadamard_overhead_{tag}.json").write_text(
        json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    md = [f"# Online Hadamard overhead ({meta['model']}, {args.layers} layers)", "",
          f"{dev.device_kind}, JAX {jax.__version__}; median of {args.repeats} after a "
          "warm-up, both variants in one run.", "",
          "| case | without (ms) | with online Hadamards (ms) | overhead |", "|---|---|---|---|"]
    md += [f"| {r['case']} | {r['base_ms']:.3f} | {r['online_ms']:.3f} | "
           f"{100 * r['overhead']:+.1f}% |" for r in rows]
    (out / f"hadamard_overhead_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
