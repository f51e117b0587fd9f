"""Quantize the embedded SmolLM2-135M with a mixed recipe and compare perplexity.

    python examples/quantize.py [--windows 2] [--seq-len 512]

Every block linear layer gets 4-bit RTN in groups of 128, except the MLP down
projections, which get 8 bits per channel; embeddings and norms stay float32.
"""

from __future__ import annotations

import argparse

import jaxquant
from jaxquant.recipes import BLOCK_LINEARS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    model = jaxquant.load_model("smollm2-135m")
    recipe = jaxquant.Recipe(rules=(
        jaxquant.Rule(pattern=r"layers\.\d+\.mlp\.down_proj\.weight",
                      spec=jaxquant.QuantSpec(bits=8, group_size=None)),
        jaxquant.Rule(pattern=BLOCK_LINEARS, spec=jaxquant.QuantSpec(bits=4, group_size=128)),
    ))
    qparams = jaxquant.quantize(model.params, recipe)
    report = jaxquant.quantization_report(model.params, qparams)
    print(f"{report['quantized_layers']} layers at {report['avg_bits']:.3f} bits/weight: "
          f"{report['float_bytes'] / 2**20:.0f} MiB -> {report['quantized_bytes'] / 2**20:.0f} MiB")

    ids = jaxquant.tokenize(model.tokenizer, jaxquant.load_text(None, "plain"))
    windows = jaxquant.make_windows(ids, args.seq_len, max_windows=args.windows)
    for name, params in (("float32", model.params), ("quantized", qparams)):
        result = jaxquant.evaluate_perplexity(params, model.config, windows, progress=False)
        print(f"{name:>9}: ppl {result.ppl:.3f}")


if __name__ == "__main__":
    main()
