"""W4A4 on the embedded SmolLM2-135M: smooth-then-rotate, 4-bit weights and activations.

    python examples/activation_quant.py [--windows 2] [--seq-len 512]

The hybrid transform (SmoothQuant on the down_proj input, then a QuaRot-style Hadamard
rotation) leaves the float model unchanged; 4-bit per-channel symmetric RTN weights
and 4-bit per-token activations are then compared with and without it.
"""

from __future__ import annotations

import argparse
import dataclasses

import jaxquant


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    model = jaxquant.load_model("smollm2-135m")
    ids = jaxquant.tokenize(model.tokenizer, jaxquant.load_text(None, "plain"))
    windows = jaxquant.make_windows(ids, args.seq_len, max_windows=args.windows)
    # SmoothQuant statistics from text after the evaluation windows (never the same text)
    calib = jaxquant.sample_windows(ids[args.windows * args.seq_len:], args.seq_len, 4, seed=0)

    spec = jaxquant.QuantSpec(bits=4, group_size=None, symmetric=True)  # integer-dot eligible
    act = jaxquant.ActQuantConfig(bits=4, clip_ratio=0.9)
    for kind in ("none", "smoothrot"):
        params, cfg, _ = jaxquant.apply_transform(
            model.params, model.config, jaxquant.TransformConfig(kind=kind), calib)
        float_ppl = jaxquant.evaluate_perplexity(params, cfg, windows, progress=False).ppl
        qparams = jaxquant.quantize(params, jaxquant.Recipe.uniform(spec))
        w4a4 = dataclasses.replace(cfg, act_quant=act)
        ppl = jaxquant.evaluate_perplexity(qparams, w4a4, windows, progress=False).ppl
        print(f"{kind:>9}: float ppl {float_ppl:.3f}  W4A4 ppl {ppl:.3f}")


if __name__ == "__main__":
    main()
