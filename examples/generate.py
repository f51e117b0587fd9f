"""Greedy text generation with the KV cache (embedded SmolLM2-135M-Instruct).

    python examples/generate.py "The three primary colours are" --tokens 24
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxquant
from jaxquant.models import transformer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt", nargs="?", default="The three primary colours are")
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()

    model = jaxquant.load_model("smollm2-135m")
    cfg, params, tok = model.config, model.params, model.tokenizer
    prompt = jnp.asarray(jaxquant.tokenize(tok, args.prompt))[None]
    step = jax.jit(transformer.decode_step, static_argnums=1)
    cache = transformer.init_cache(cfg, batch=1, max_len=prompt.shape[1] + args.tokens)
    logits, cache = step(params, cfg, prompt, cache)
    out = []
    for _ in range(args.tokens):
        nxt = jnp.argmax(logits[:, -1], axis=-1)
        if cfg.eos_token_id is not None and int(nxt[0]) == cfg.eos_token_id:
            break
        out.append(int(nxt[0]))
        logits, cache = step(params, cfg, nxt[:, None], cache)
    print(args.prompt + tok.decode(out))


if __name__ == "__main__":
    main()
