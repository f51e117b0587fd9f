"""Perplexity of the embedded SmolLM2-135M on the first windows of a text.

    python examples/perplexity.py [--data PATH] [--windows N] [--seq-len L]

Without --data, uses the embedded King James Bible demo corpus.
"""

from __future__ import annotations

import argparse

import jaxquant


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=None, help="text file (default: demo corpus)")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    model = jaxquant.load_model("smollm2-135m")
    text = jaxquant.load_text(args.data, "wikitext" if args.data else "plain")
    ids = jaxquant.tokenize(model.tokenizer, text)
    windows = jaxquant.make_windows(ids, args.seq_len, max_windows=args.windows)
    result = jaxquant.evaluate_perplexity(model.params, model.config, windows)
    print(f"{model.config.family}, {model.config.num_params():,} parameters: "
          f"ppl {result.ppl:.3f} over {result.windows} x {result.seq_len} tokens "
          f"({result.tokens_per_second:.0f} tok/s)")


if __name__ == "__main__":
    main()
