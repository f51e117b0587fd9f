"""RTN, AWQ, GPTQ, SliM-LLM, SliM-LLM+ and CLAQ on SmolLM2-135M, accuracy protocols of MISSION.md.

Calibration: 128 random 2048-token windows, seed 0 (GPTQ reference sampling), of
``wiki.test.calib.raw`` (in-domain) or of the Austen novels (cross-domain);
evaluation on ``wiki.test.eval.raw`` (72 windows). Group 128, asymmetric, bf16
scales and zeros. Each run appends one JSON line to
``benchmarks/results/ptq_accuracy_<protocol>.jsonl`` (so a table can be filled by
several shorter runs); ``--table`` writes ``ptq_accuracy.md`` from both protocols'
lines, with the authors' reference implementations' numbers beside ours when a
``--reference`` JSONL file (from the scratch runners) is given.

Every row also records the perplexity on 8 windows of the *calibration* text
(``calib_ppl``): choices such as SQC's salience weight are made on it, never on the
evaluation text.

    python benchmarks/ptq_accuracy.py --protocol in-domain --methods rtn,gptq,slim --bits 3
    python benchmarks/ptq_accuracy.py --protocol in-domain --methods slim --bits 3 \\
        --salience-weights 1,2,4,8,16
    python benchmarks/ptq_accuracy.py --table [--reference ref.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxquant
from jaxquant.calibration import Calibration
from jaxquant.data import load_text, make_windows, sample_windows, tokenize
from jaxquant.transforms.awq import awq

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
#: label -> QuantSpec keyword arguments
METHODS = {
    "rtn": {"method": "rtn"},
    # AWQ's activation-aware scales and clipping (searched on the calibration windows),
    # then RTN: the weight-only baseline.
    "awq": {"method": "rtn"},
    "gptq": {"method": "gptq"},
    "gptq-act": {"method": "gptq", "act_order": True},
    "slim": {"method": "slim"},
    "slim-act": {"method": "slim", "act_order": True},
    "slim+": {"method": "slim+"},
    "slim+-act": {"method": "slim+", "act_order": True},
    # CLAQ (per-column codebooks, no groups; act-order as published), and its ablations.
    "claq": {"method": "claq", "act_order": True, "group_size": None},
    "claq-or": {"method": "claq", "act_order": True, "group_size": None,
                "outlier_ratio": 0.005},
    "claq-total": {"method": "claq", "act_order": True, "group_size": None,
                   "total_bits": True},
    "claq-noadapt": {"method": "claq", "act_order": True, "group_size": None,
                     "adaptive": False},
    "claq-nokmeans": {"method": "claq", "act_order": True, "group_size": None,
                      "kmeans": False},
}


def run_protocol(args: argparse.Namespace) -> None:
    model = jaxquant.load_model(args.model)
    wiki = Path(args.wiki_dir)
    eval_ids = tokenize(model.tokenizer, load_text(wiki / "wiki.test.eval.raw", "wikitext"))
    windows = make_windows(eval_ids, 2048, args.eval_windows)
    if args.protocol == "in-domain":
        calib_text = load_text(wiki / "wiki.test.calib.raw", "wikitext")
    else:
        calib_text = load_text(args.austen_dir, "plain")
    calib_ids = tokenize(model.tokenizer, calib_text)
    calib_eval = make_windows(calib_ids, 2048, 8)
    calibration = Calibration(config=model.config, batch_size=args.batch_size,
                              progress=args.progress,
                              windows=sample_windows(calib_ids, 2048, args.calib_windows,
                                                     seed=0))
    device = jax.devices()[0]
    out = Path(args.out) / f"ptq_accuracy_{args.protocol}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)

    def ppl(params, w) -> float:
        return jaxquant.evaluate_perplexity(params, model.config, w, batch_size=args.batch_size,
                                            progress=False).ppl

    def record(row: dict) -> None:
        row.update({"protocol": args.protocol, "eval_windows": len(windows),
                    "calib_windows": args.calib_windows,
                    "device": f"{device.device_kind} ({jax.default_backend()})",
                    "jax": jax.__version__})
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['label']:<40} {row['avg_bits']:6.3f} bits  ppl {row['ppl']:12.3f}  "
              f"calib ppl {row['calib_ppl']:10.3f}  ({row.get('seconds') or 0:.0f} s)",
              flush=True)

    if args.float:
        record({"label": "float32", "method": "float32", "bits": 32, "avg_bits": 32.0,
                "ppl": ppl(model.params, windows), "calib_ppl": ppl(model.params, calib_eval)})
    weights = [float(x) for x in args.salience_weights.split(",")] if args.salience_weights \
        else [None]
    for bits in [float(b) if "." in b else int(b) for b in args.bits.split(",")]:
        for name in args.methods.split(","):
            for lam in weights if name.startswith("slim") else [None]:
                kw = {"bits": bits, "group_size": 128, **METHODS[name]}
                if name.startswith("claq") and args.outlier_ratio is not None:
                    kw["outlier_ratio"] = args.outlier_ratio
                if lam is not None:
                    kw["salience_weight"] = lam
                if args.lwc_epochs and name.startswith("slim+"):
                    kw["lwc_epochs"] = args.lwc_epochs
                if args.lwc_dtype and name.startswith("slim+"):
                    kw["lwc_dtype"] = args.lwc_dtype
                spec = jaxquant.QuantSpec(**kw)
                t = time.perf_counter()
                try:
                    params = model.params
                    if name == "awq":
                        params = awq(params, model.config, calibration.windows, bits=bits,
                                     group_size=spec.group_size, symmetric=spec.symmetric,
                                     scale_dtype=jnp.dtype(spec.scale_dtype),
                                     batch_size=args.batch_size)
                    q, stats = jaxquant.quantize(params, jaxquant.Recipe.uniform(spec),
                                                 None if spec.method == "rtn" else calibration,
                                                 return_stats=True)
                    q = jax.block_until_ready(q)
                except Exception:  # keep going: one failing row must not lose the rest
                    traceback.print_exc()
                    continue
                seconds = time.perf_counter() - t
                report = jaxquant.quantization_report(model.params, q)
                errs = [v["relative_error"] for v in stats.get("layers", {}).values()]
                label = (("awq+" if name == "awq" else "") + spec.describe()
                         + (f" lambda={lam:g}" if lam is not None else ""))
                row = {"label": label, "method": name, "bits": bits,
                       "avg_bits": report["avg_bits"], "ppl": ppl(q, windows),
                       "calib_ppl": ppl(q, calib_eval), "seconds": seconds,
                       "salience_weight": spec.salience_weight if name.startswith("slim")
                       else None,
                       "mean_layer_error": sum(errs) / len(errs) if errs else None}
                if name.startswith("slim+"):
                    row["lwc_epochs"] = spec.lwc_epochs
                    row["lwc_dtype"] = spec.lwc_dtype
                if "blocks" in stats:
                    row["blocks_kept_lwc"] = sum(b["kept"] == "lwc"
                                                 for b in stats["blocks"].values())
                record(row)


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def write_table(args: argparse.Namespace) -> None:
    rows = []
    for proto in ("in-domain", "cross-domain"):
        path = Path(args.out) / f"ptq_accuracy_{proto}.jsonl"
        if path.exists():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    refs = []
    if args.reference:
        refs = [json.loads(line) for line in Path(args.reference).read_text().splitlines()
                if line]
    default_lam = jaxquant.QuantSpec().salience_weight

    def pick(proto: str, method: str, bits: int) -> dict | None:
        cands = [r for r in rows if r["protocol"] == proto and r["method"] == method
                 and r["bits"] == bits and r.get("salience_weight") in (None, default_lam)]
        return cands[-1] if cands else None

    def ref(proto: str, method: str, bits: int) -> dict | None:
        cands = [r for r in refs if r.get("protocol") == proto and r["method"] == method
                 and r["bits"] == bits]
        return cands[-1] if cands else None

    md = ["# Weight-only PTQ of SmolLM2-135M: RTN, AWQ, GPTQ, SliM-LLM, SliM-LLM+ (group 128)", "",
          "WikiText-2 perplexity on `wiki.test.eval.raw` (72 windows of 2048). Calibration: "
          "128 x 2048 tokens, seed 0, of `wiki.test.calib.raw` (in-domain) or the Austen "
          "novels (cross-domain). Asymmetric, bf16 scales and zeros; bits/weight counts "
          "everything stored (codes, scales, zeros, permutations). `ref.` columns: the "
          "authors' code (IST-DASLab/gptq, Aaronhuang-778/SliM-LLM) run on the same model, "
          "tokens and protocol (scratch, not committed).", ""]
    labels = [("rtn", "RTN"), ("awq", "AWQ (+RTN)"), ("gptq", "GPTQ"),
              ("gptq-act", "GPTQ act-order"),
              ("slim", "SliM-LLM"), ("slim-act", "SliM-LLM act-order"),
              ("slim+", "SliM-LLM+"), ("slim+-act", "SliM-LLM+ act-order")]
    for proto in ("in-domain", "cross-domain"):
        fl = [r for r in rows if r["protocol"] == proto and r["method"] == "float32"]
        md += [f"## {proto}" + (f" (float32: {fl[-1]['ppl']:.3f})" if fl else ""), "",
               "| method | bits | bits/weight | PPL | ref. PPL | calib-text PPL | time (s) |",
               "|---|---|---|---|---|---|---|"]
        for bits in (4, 3, 2):
            for key, name in labels:
                r = pick(proto, key, bits)
                rr = ref(proto, key, bits)
                if r is None and rr is None:
                    continue
                md.append(
                    f"| {name} | {bits} | {r['avg_bits']:.3f} | {_fmt(r['ppl'])} | "
                    f"{_fmt(rr['ppl']) if rr else '–'} | {_fmt(r['calib_ppl'])} | "
                    f"{r['seconds'] or 0:.0f} |" if r else
                    f"| {name} | {bits} | – | – | {_fmt(rr['ppl'])} | – | – |")
        md.append("")
        claq_rows = [r for r in rows if r["protocol"] == proto
                     and str(r["method"]).startswith("claq")]
        if claq_rows:
            md += ["CLAQ (per-column K-Means codebooks, no groups; act-order; bits/weight "
                   "counts codes, fp16 codebooks, the permutation and float outliers; the "
                   "budget is the code width, or the whole bits/weight for 'total' rows):", "",
                   "| variant | budget | bits/weight | PPL | calib-text PPL | time (s) |",
                   "|---|---|---|---|---|---|"]
            for r in sorted(claq_rows, key=lambda r: (-r["avg_bits"], r["label"])):
                md.append(f"| {r['label']} | {r['bits']:g} | {r['avg_bits']:.3f} | "
                          f"{_fmt(r['ppl'])} | {_fmt(r['calib_ppl'])} | {r['seconds']:.0f} |")
            md.append("")
        lam_rows = [r for r in rows if r["protocol"] == proto and r["method"] == "slim"
                    and r.get("salience_weight") is not None]
        if len({r["salience_weight"] for r in lam_rows}) > 1:
            md += ["SQC salience weight (lambda) sweep, SliM-LLM:", "",
                   "| bits | lambda | PPL | calib-text PPL | mean layer error |",
                   "|---|---|---|---|---|"]
            for r in sorted(lam_rows, key=lambda r: (-r["bits"], r["salience_weight"])):
                md.append(f"| {r['bits']} | {r['salience_weight']:g} | {_fmt(r['ppl'])} | "
                          f"{_fmt(r['calib_ppl'])} | {r['mean_layer_error']:.4g} |")
            md.append("")
    noted = sorted({r["note"] for r in rows if r.get("note")})
    md += [f"- Rows marked in the JSON lines: {n}." for n in noted]
    md += [f"- {n}" for n in args.note or []]
    md.append("")
    devices = sorted({r["device"] + ", JAX " + r["jax"] for r in rows})
    md += [f"Measured on: {'; '.join(devices)}. Time: quantization including calibration "
           "and compilation.", ""]
    (Path(args.out) / "ptq_accuracy.md").write_text("\n".join(md))
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=["in-domain", "cross-domain"], default="in-domain")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--wiki-dir", default=str(SHARED / "wikitext-2-raw"))
    parser.add_argument("--austen-dir", default=str(SHARED / "austen"))
    parser.add_argument("--methods", default="rtn,gptq,gptq-act,slim,slim+")
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--salience-weights", help="slim: comma-separated SQC lambdas")
    parser.add_argument("--lwc-epochs", type=int, help="slim+: override the epochs")
    parser.add_argument("--outlier-ratio", type=float,
                        help="claq: override the outlier ratio (claq-or: 0.005)")
    parser.add_argument("--lwc-dtype", choices=["float32", "bfloat16"],
                        help="slim+: training compute dtype")
    parser.add_argument("--float", action="store_true", help="also score the float model")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, help="only the first N (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--table", action="store_true", help="write the markdown table only")
    parser.add_argument("--reference", help="JSONL of the reference implementations' runs")
    parser.add_argument("--note", action="append", help="a line for the table's notes")
    args = parser.parse_args()
    if args.table:
        write_table(args)
    else:
        run_protocol(args)


if __name__ == "__main__":
    main()
