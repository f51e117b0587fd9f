"""Storage account vs bytes measured, in memory and on disk, for uniform RTN formats.

For 4/3/2-bit asymmetric group-128 with bf16 scales and zeros: (a) a 4096 x 4096
layer, where 128 divides the input dimension (expected 4.25 / 3.25 / 2.25 bits per
weight); (b) every block linear layer of SmolLM2-135M (short last groups where the
input is 576 = 4 x 128 + 64), saved as a jaxquant checkpoint. Measured: the bytes
of the arrays in memory, and the bytes of their files on disk. Writes
``benchmarks/results/rtn_storage.{json,md}``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxquant
from jaxquant.algorithms.rtn import rtn
from jaxquant.checkpoints.jq_checkpoint import data_bytes
from jaxquant.formats import storage_bits
from jaxquant.params import flatten

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    rows = []
    w = jax.random.normal(jax.random.PRNGKey(0), (4096, 4096), jnp.float32)
    model = jaxquant.load_model("smollm2-135m")
    for bits in (4, 3, 2):
        q = rtn(w, bits=bits, group_size=128, symmetric=False, scale_dtype=jnp.bfloat16)
        formula = storage_bits(q.shape, bits=bits, group_size=128, symmetric=False,
                               scale_dtype=jnp.bfloat16)
        spec = jaxquant.QuantSpec(bits=bits, group_size=128)
        qparams = jaxquant.quantize(model.params, jaxquant.Recipe.uniform(spec))
        report = jaxquant.quantization_report(model.params, qparams)
        layers = [(p, v) for p, v in flatten(qparams).items() if jaxquant.formats.is_quantized(v)]
        mem = sum(v.nbytes for _, v in layers)
        weights = sum(v.num_weights for _, v in layers)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "q"
            jaxquant.save_checkpoint(ckpt, config=model.config, params=qparams)
            disk_layers = sum(data_bytes(ckpt, prefix=p + ".") for p, _ in layers)
            disk_all = data_bytes(ckpt)
        rows.append({
            "bits": bits,
            "layer_4096_bits_per_weight": q.bits_per_weight,
            "layer_4096_formula_bits": formula / q.num_weights,
            "smollm2_layers": len(layers),
            "smollm2_avg_bits_account": report["avg_bits"],
            "smollm2_layer_bytes_memory": mem,
            "smollm2_layer_bytes_disk": disk_layers,
            "smollm2_avg_bits_disk": 8 * disk_layers / weights,
            "smollm2_model_bytes_memory": report["quantized_bytes"],
            "smollm2_model_bytes_disk": disk_all,
        })
    out = ROOT / "benchmarks" / "results"
    (out / "rtn_storage.json").write_text(json.dumps({"rows": rows,
                                                       "jax": jax.__version__}, indent=2) + "\n")
    md = ["# Storage of uniform RTN (asymmetric, group 128, bf16 scales and zeros)", "",
          "| bits | 4096x4096 layer: bits/weight | SmolLM2 linear layers: account | "
          "SmolLM2 linear layers: on disk | layer bytes memory = disk | whole model bytes "
          "memory = disk |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(
            f"| {r['bits']} | {r['layer_4096_bits_per_weight']:.4f} | "
            f"{r['smollm2_avg_bits_account']:.4f} | {r['smollm2_avg_bits_disk']:.4f} | "
            f"{r['smollm2_layer_bytes_memory']:,} = {r['smollm2_layer_bytes_disk']:,} | "
            f"{r['smollm2_model_bytes_memory']:,} = {r['smollm2_model_bytes_disk']:,} |")
    md += ["", "On disk: the array files of a jaxquant checkpoint (raw, uncompressed, one per "
           "array; Orbax metadata and tokenizer.json excluded). The whole-model bytes include "
           "the float32 embedding table and norms.", ""]
    (out / "rtn_storage.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
