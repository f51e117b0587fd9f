"""End-to-end quantization time of SmolLM2-135M on this (CPU) machine.

Times ``jaxquant.quantize`` with sequential calibration (embedding, every block's
forward passes and input statistics, the per-layer quantization, compilation) for
the methods asked, on ``wiki.test.calib.raw`` windows sampled with seed 0, and
records the host's peak RSS. Writes ``benchmarks/results/smollm2_cpu_quantize.{json,md}``.

    python benchmarks/cpu_quantize_time.py --methods gptq,slim --calib-windows 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import jax

import jaxquant
from jaxquant.calibration import Calibration
from jaxquant.data import load_text, sample_windows, tokenize

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.calib.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="gptq,slim")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--calib", default=str(CALIB))
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    model = jaxquant.load_model("smollm2-135m")
    ids = tokenize(model.tokenizer, load_text(args.calib, "wikitext"))
    calib = Calibration(config=model.config, progress=False,
                        windows=sample_windows(ids, args.seq_len, args.calib_windows, seed=0))
    rows = []
    for method in args.methods.split(","):
        spec = jaxquant.QuantSpec(method=method, bits=args.bits, group_size=128)
        start = time.perf_counter()
        q, stats = jaxquant.quantize(model.params, jaxquant.Recipe.uniform(spec), calib,
                                     return_stats=True)
        jax.block_until_ready(q)
        seconds = time.perf_counter() - start
        layer_s = sum(v["seconds"] for v in stats["layers"].values())
        rows.append({"method": spec.describe(), "seconds": seconds,
                     "layer_seconds": layer_s,
                     "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
        print(rows[-1], flush=True)
    report = {"model": "smollm2-135m", "calib_windows": args.calib_windows,
              "seq_len": args.seq_len, "rows": rows, "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "jax": jax.__version__}
    out = Path(args.out)
    (out / "smollm2_cpu_quantize.json").write_text(json.dumps(report, indent=2) + "\n")
    md = ["# SmolLM2-135M end-to-end quantization time on the CPU", "",
          f"{args.calib_windows} x {args.seq_len} calibration tokens of wiki.test.calib.raw "
          f"(seed 0), {args.bits}-bit g128, {os.cpu_count()} CPU cores, JAX {jax.__version__}. "
          "Time of `jaxquant.quantize` (calibration forward passes, statistics, compilation, "
          "quantization; model loading excluded). Peak RSS is the process's so far.", "",
          "| method | total (s) | peak RSS (GiB) |", "|---|---|---|"]
    md += [f"| {r['method']} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} |" for r in rows]
    md += ["", "Almost all of the time is the calibration forward passes (float32, "
           "`precision=HIGHEST`, full causal attention on 2048-token windows); the "
           "per-layer times in the JSON include waiting for them (JAX dispatches "
           "asynchronously)."]
    (out / "smollm2_cpu_quantize.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
