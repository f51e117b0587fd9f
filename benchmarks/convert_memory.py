"""Peak host memory and time of loading and converting SmolLM2-135M (streaming check).

Runs each step in a fresh process and reads its peak RSS (``VmHWM``):
import + JAX init (baseline), GGUF -> params, GGUF -> jaxquant checkpoint, and
jaxquant checkpoint -> params. Writes ``benchmarks/results/convert_memory.{json,md}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = textwrap.dedent("""
    import json, sys, time
    import jax, jax.numpy as jnp
    import jaxquant, orbax.checkpoint, gguf
    jnp.zeros(1).block_until_ready()
    t = time.perf_counter()
    what, src, out = sys.argv[1:4]
    if what == "load":
        m = jaxquant.load_model(src)
        jax.block_until_ready(m.params)
    elif what == "convert":
        m = jaxquant.load_model(src)
        jaxquant.save_checkpoint(out, config=m.config, params=m.params, tokenizer=m.tokenizer)
    seconds = time.perf_counter() - t
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec).
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"peak_mb": int(hwm.split()[1]) / 1024, "seconds": seconds}))
""")


def run(what: str, src: str, out: str = "-") -> dict:
    proc = subprocess.run([sys.executable, "-c", STEP, what, src, out], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import jax

    from jaxquant.checkpoints.info import model_info

    params = model_info("smollm2-135m")["parameters"]
    model_mb = params * 4 / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        rows = {
            "baseline (imports, JAX init)": run("none", "-"),
            "GGUF -> float32 params": run("load", "smollm2-135m"),
            "GGUF -> jaxquant checkpoint": run("convert", "smollm2-135m", ckpt),
            "jaxquant checkpoint -> params": run("load", ckpt),
        }
    base = rows["baseline (imports, JAX init)"]["peak_mb"]
    report = {"model": "smollm2-135m", "parameters": params, "float32_model_mb": model_mb,
              "jax": jax.__version__, "cpu_count": os.cpu_count(), "steps": rows}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "convert_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    md = ["# Conversion memory and time, SmolLM2-135M (float32 params: "
          f"{model_mb:.0f} MiB)", "",
          "| step | peak RSS (MiB) | over baseline | over baseline / model size | seconds |",
          "|---|---|---|---|---|"]
    for name, r in rows.items():
        over = r["peak_mb"] - base
        md.append(f"| {name} | {r['peak_mb']:.0f} | {over:.0f} | {over / model_mb:.2f} | "
                  f"{r['seconds']:.1f} |")
    md += ["", f"CPU, {os.cpu_count()} cores, JAX {jax.__version__}. Each step in a fresh "
           "process; peak RSS is its VmHWM. On the CPU backend device arrays live in host "
           "memory, so the model itself counts once.", ""]
    (out / "convert_memory.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
