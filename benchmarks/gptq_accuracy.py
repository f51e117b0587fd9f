"""GPTQ vs RTN on SmolLM2-135M, accuracy protocols of MISSION.md (group 128).

Calibration: 128 random 2048-token windows, seed 0 (GPTQ reference sampling), of
``wiki.test.calib.raw`` (in-domain) or of the Austen novels (cross-domain);
evaluation on ``wiki.test.eval.raw`` (72 windows). Methods: RTN, GPTQ, GPTQ with
act-order, at 4, 3 and 2 bits, asymmetric, bf16 scales and zeros. Writes
``benchmarks/results/gptq_accuracy_<protocol>.{json,md}``.

    python benchmarks/gptq_accuracy.py --protocol in-domain [--model PATH] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

import jaxquant
from jaxquant.calibration import Calibration
from jaxquant.data import load_text, make_windows, sample_windows, tokenize

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=["in-domain", "cross-domain"], default="in-domain")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--wiki-dir", default=str(SHARED / "wikitext-2-raw"))
    parser.add_argument("--austen-dir", default=str(SHARED / "austen"))
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, help="only the first N (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    model = jaxquant.load_model(args.model)
    wiki = Path(args.wiki_dir)
    eval_ids = tokenize(model.tokenizer, load_text(wiki / "wiki.test.eval.raw", "wikitext"))
    windows = make_windows(eval_ids, 2048, args.eval_windows)
    if args.protocol == "in-domain":
        calib_text = load_text(wiki / "wiki.test.calib.raw", "wikitext")
    else:
        calib_text = load_text(args.austen_dir, "plain")
    calib_ids = tokenize(model.tokenizer, calib_text)
    calibration = Calibration(config=model.config, batch_size=args.batch_size, progress=False,
                              windows=sample_windows(calib_ids, 2048, args.calib_windows, seed=0))
    rows = []

    def run(label: str, params, seconds: float | None, avg_bits: float) -> None:
        res = jaxquant.evaluate_perplexity(params, model.config, windows,
                                           batch_size=args.batch_size, progress=False)
        rows.append({"method": label, "avg_bits": avg_bits, "ppl": res.ppl,
                     "quantize_seconds": seconds})
        print(f"{label:<34} {avg_bits:6.3f} bits  ppl {res.ppl:12.3f}  "
              f"({seconds or 0:.0f} s)", flush=True)

    run("float32", model.params, None, 32.0)
    for bits in [int(b) for b in args.bits.split(",")]:
        for method, act in (("rtn", False), ("gptq", False), ("gptq", True)):
            spec = jaxquant.QuantSpec(method=method, bits=bits, group_size=128, act_order=act)
            t = time.perf_counter()
            q = jaxquant.quantize(model.params, jaxquant.Recipe.uniform(spec),
                                  calibration if method == "gptq" else None)
            q = jax.block_until_ready(q)
            seconds = time.perf_counter() - t
            report = jaxquant.quantization_report(model.params, q)
            run(spec.describe(), q, seconds, report["avg_bits"])

    device = jax.devices()[0]
    report = {"model": args.model, "protocol": args.protocol,
              "calibration": "wiki.test.calib.raw" if args.protocol == "in-domain"
              else "austen/*.txt", "calib_windows": args.calib_windows, "seed": 0,
              "eval": "wiki.test.eval.raw", "eval_windows": len(windows), "rows": rows,
              "device": f"{device.device_kind} ({jax.default_backend()})",
              "jax": jax.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"gptq_accuracy_{args.protocol}"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# GPTQ vs RTN on SmolLM2-135M, {args.protocol} protocol, group 128", "",
          f"Calibration: {args.calib_windows} x 2048 tokens of {report['calibration']} "
          f"(seed 0); evaluation: {len(windows)} windows of wiki.test.eval.raw.", "",
          "| method | bits/weight (linear layers) | PPL | quantize time (s) |",
          "|---|---|---|---|"]
    for r in rows:
        t = "" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.0f}"
        md.append(f"| {r['method']} | {r['avg_bits']:.3f} | {r['ppl']:.3f} | {t} |")
    md += ["", f"Device: {report['device']}, JAX {jax.__version__}. Quantize time includes "
           "calibration and compilation.", ""]
    (out / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
