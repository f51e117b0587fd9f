"""What QuaRot's online Hadamards cost in a jitted forward (Llama-2-7B shapes, random weights).

The same bf16 weights run with ``ModelConfig.online_hadamard`` off and on. On: a
Hadamard of the down_proj input (11008 = 172 x 64) and of the o_proj input across all
heads (4096 = 64 x 64); with a quantized KV cache (``--kv-bits``, the W4A4KV4 setting)
also of queries and keys over head_dim (128), compared with the same quantized cache
without Hadamards. Both variants of a pair run in the same process:

* prefill: a full-sequence forward (``B x T`` of ``--prefill``);
* decode: greedy single-token steps with a KV cache of ``--context`` tokens, run as a
  serving loop does: ``--steps`` steps inside one jitted ``lax.fori_loop`` (``fused``),
  and one jitted, cache-donating step per Python iteration (``python``, host dispatch
  included);
* the transform alone against the down_proj matmul it precedes (``2048 x 11008``).

Times: wall clock (warm-up, ``block_until_ready``, median of ``--repeats``) and, on a
GPU, CUPTI device time (the sum of the kernels' times, gaps between kernels and host
dispatch excluded; :func:`benchmarks.timing.device_us`).

    python benchmarks/hadamard_overhead.py [--layers 32] [--out benchmarks/results/gpu]

Writes ``hadamard_overhead_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.configs import llama2_7b
from benchmarks.decode_gpu import decode_loop, python_loop
from benchmarks.report import environment
from benchmarks.timing import device_us, wall_us
from jaxquant.models.transformer import forward, init_cache, init_params
from jaxquant.transforms.hadamard import hadamard_transform

ROOT = Path(__file__).resolve().parents[1]


def _prefill(params, cfg, b: int, t: int, repeats: int) -> dict[str, float]:
    tokens = jnp.zeros((b, t), jnp.int32) + jnp.arange(t, dtype=jnp.int32) % 31999
    fwd = jax.jit(lambda p, x: forward(p, cfg, x))
    return {"wall_ms": wall_us(fwd, params, tokens, runs=repeats) / 1e3,
            "device_ms": device_us(fwd, [(params, tokens)], iterations=repeats) / 1e3}


def _decode(params, cfg, b: int, context: int, steps: int, repeats: int
            ) -> dict[str, float]:
    """Milliseconds per decode step: fused loop (wall, device) and Python loop (wall)."""
    cache = init_cache(cfg, b, context + steps + 8, jnp.bfloat16)
    cache["length"] = jnp.asarray(context, jnp.int32)
    forced = jnp.ones((b, steps), jnp.int32)
    one, n = jnp.asarray(1, jnp.int32), jnp.asarray(steps, jnp.int32)
    loop = jax.jit(lambda p, c: decode_loop(p, cfg, c, forced, one, n)[0])
    fused = wall_us(loop, params, cache, runs=repeats) / 1e3 / steps
    dev = device_us(loop, [(params, cache)], iterations=repeats) / 1e3 / steps
    tok = jnp.ones((b,), jnp.int32)
    jax.block_until_ready(python_loop(params, cfg, cache, tok, 2))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(python_loop(params, cfg, cache, tok, steps))
        times.append((time.perf_counter() - t0) * 1e3 / steps)
    return {"fused_wall_ms": fused, "device_ms": dev,
            "python_wall_ms": sorted(times)[len(times) // 2]}


def write(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    """Writes the JSON and markdown of the rows so far."""
    dev = jax.devices()[0]
    meta = {**environment(), "device": dev.device_kind, "backend": jax.default_backend(),
            "layers": args.layers, "repeats": args.repeats, "steps": args.steps,
            "model": "Llama-2-7B shapes, random bf16 weights"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = dev.device_kind.lower().replace(" ", "_")
    (out / f"hadamard_overhead_{tag}.json").write_text(
        json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    md = [f"# Online Hadamard overhead ({meta['model']}, {args.layers} layers)", "",
          f"{dev.device_kind}, JAX {jax.__version__}; both variants of each row in one run. "
          f"Wall: median of {args.repeats} after a warm-up. Device: CUPTI sum of kernel "
          f"times. Decode: per step, {args.steps} steps in one jitted loop (fused) or one "
          "dispatch per step (python).", "",
          "| case | time | without (ms) | with online Hadamards (ms) | overhead |",
          "|---|---|---|---|---|"]
    names = {"wall_ms": "wall", "fused_wall_ms": "wall, fused loop",
             "python_wall_ms": "wall, Python loop", "device_ms": "device"}
    for r in rows:
        for key, name in names.items():
            if f"base_{key}" in r:
                md.append(f"| {r['case']} | {name} | {r[f'base_{key}']:.3f} | "
                          f"{r[f'online_{key}']:.3f} | {100 * r[f'overhead_{key}']:+.1f}% |")
    (out / f"hadamard_overhead_{tag}.md").write_text("\n".join(md) + "\n")
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prefill", default="1x2048,8x512", help="BxT shapes of the forward")
    parser.add_argument("--decode", default="1,16", help="batch sizes of decode steps")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens when decoding")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed loop")
    parser.add_argument("--kv-bits", type=int, default=4,
                        help="quantized-cache pair (adds the q/k Hadamards); 0: skip it")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    args = parser.parse_args()

    cfg = llama2_7b(args.layers)
    pairs = [("bf16 cache", cfg)]
    if args.kv_bits:
        pairs.append((f"{args.kv_bits}-bit cache",
                      dataclasses.replace(cfg, kv_bits=args.kv_bits)))
    params = init_params(cfg, dtype=jnp.bfloat16)
    rows = []

    def add(case: str, base: dict, online: dict) -> None:
        row = {"case": case, **{f"base_{k}": v for k, v in base.items()},
               **{f"online_{k}": v for k, v in online.items()}}
        row.update({f"overhead_{k}": online[k] / base[k] - 1 for k in base})
        rows.append(row)
        print(row, flush=True)
        write(args, rows)

    for label, c in pairs:
        on = dataclasses.replace(c, online_hadamard=True)
        for shape in args.prefill.split(","):
            b, t = (int(v) for v in shape.split("x"))
            add(f"prefill B={b} T={t}, {label}", _prefill(params, c, b, t, args.repeats),
                _prefill(params, on, b, t, args.repeats))
        for b in (int(v) for v in args.decode.split(",")):
            add(f"decode step B={b} (context {args.context}), {label}",
                _decode(params, c, b, args.context, args.steps, args.repeats),
                _decode(params, on, b, args.context, args.steps, args.repeats))
    # The transform alone, against the down_proj matmul it precedes.
    x = jax.random.normal(jax.random.key(0), (2048, cfg.intermediate_size), jnp.bfloat16)
    w = params["layers"][0]["mlp"]["down_proj"]["weight"]
    had, mm = jax.jit(hadamard_transform), jax.jit(lambda a, b: a @ b.T)
    t_had = device_us(had, [(x,)], iterations=args.repeats) / 1e3
    t_mm = device_us(mm, [(x, w)], iterations=args.repeats) / 1e3
    rows.append({"case": "2048 x 11008 bf16: Hadamard alone vs the down_proj matmul",
                 "base_device_ms": t_mm, "online_device_ms": t_mm + t_had,
                 "overhead_device_ms": t_had / t_mm})
    print("\n".join(write(args, rows)))



if __name__ == "__main__":
    main()
