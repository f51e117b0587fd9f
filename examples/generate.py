"""Greedy text generation with the KV cache, float and 4-bit (embedded SmolLM2-135M-Instruct).

    python examples/generate.py "The three primary colours are" --tokens 24
"""

from __future__ import annotations

import argparse

import jaxquant


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt", nargs="?", default="The three primary colours are")
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()

    model = jaxquant.load_model("smollm2-135m")
    prompt = jaxquant.tokenize(model.tokenizer, args.prompt)
    qparams = jaxquant.quantize(model.params, jaxquant.Recipe.uniform(
        jaxquant.QuantSpec(bits=4, group_size=128)))
    stop = () if model.config.eos_token_id is None else (model.config.eos_token_id,)
    for name, params in (("float32", model.params), ("rtn 4-bit g128", qparams)):
        ids = jaxquant.greedy_generate(params, model.config, prompt,
                                       max_new_tokens=args.tokens, stop_ids=stop)
        print(f"[{name}] {args.prompt}{model.tokenizer.decode(ids)}")


if __name__ == "__main__":
    main()
