"""RTN accuracy table for SmolLM2-135M on the in-domain accuracy protocol (MISSION.md).

Evaluates on ``wiki.test.eval.raw`` (72 windows of 2048 tokens; RTN needs no
calibration) the float model and RTN at 8/4/3/2 bits, per output channel and group
128, asymmetric and symmetric (bf16 scales and zeros), every block linear layer
quantized; embeddings, lm_head and norms stay float. Writes
``benchmarks/results/rtn_accuracy.{json,md}``.

    python benchmarks/rtn_accuracy.py [--model smollm2-135m|PATH.gguf] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import jax

import jaxquant
from jaxquant.data import load_text, make_windows, tokenize
from jaxquant.quantize import quantization_report, quantize
from jaxquant.recipes import QuantSpec, Recipe

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.eval.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(EVAL))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    model = jaxquant.load_model(args.model)
    ids = tokenize(model.tokenizer, load_text(args.data, "wikitext"))
    windows = make_windows(ids, 2048, args.max_windows)
    rows = []

    def run(label: str, params, spec: QuantSpec | None) -> None:
        t = time.perf_counter()
        res = jaxquant.evaluate_perplexity(params, model.config, windows,
                                           batch_size=args.batch_size, progress=False)
        report = quantization_report(model.params, params) if spec else None
        rows.append({
            "label": label,
            "bits": spec.bits if spec else 32,
            "group_size": spec.group_size if spec else None,
            "symmetric": spec.symmetric if spec else None,
            "avg_bits_linear": report["avg_bits"] if report else 32.0,
            "model_bytes": report["quantized_bytes"] if report else None,
            "ppl": res.ppl,
            "seconds": time.perf_counter() - t,
        })
        print(f"{label:<28} ppl {res.ppl:10.3f}", flush=True)

    run("float32", model.params, None)
    for bits, group, sym in itertools.product([8, 4, 3, 2], [None, 128], [False, True]):
        spec = QuantSpec(bits=bits, group_size=group, symmetric=sym)
        qparams = quantize(model.params, Recipe.uniform(spec))
        run(spec.describe(), qparams, spec)

    device = jax.devices()[0]
    report = {
        "model": args.model, "data": os.path.basename(args.data), "windows": len(windows),
        "seq_len": 2048, "scale_dtype": "bfloat16", "rows": rows,
        "device": f"{device.device_kind} ({jax.default_backend()})",
        "jax": jax.__version__, "python": platform.python_version(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rtn_accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# RTN on SmolLM2-135M, in-domain protocol ({len(windows)} windows of 2048 tokens "
          f"of {report['data']})", "",
          "Every block linear layer quantized (bf16 scales/zeros); embeddings, lm_head, norms "
          "in float32.", "",
          "| method | bits/weight (linear layers) | PPL | vs float |", "|---|---|---|---|"]
    base = rows[0]["ppl"]
    for r in rows:
        md.append(f"| {r['label']} | {r['avg_bits_linear']:.3f} | {r['ppl']:.3f} | "
                  f"{r['ppl'] / base - 1:+.1%} |")
    md += ["", f"Device: {report['device']}, JAX {jax.__version__}.", ""]
    (out / "rtn_accuracy.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
