"""GPU dequant-matmul kernels against XLA (issue 7's table), on a Hopper GPU.

For Llama-2-7B shapes (4096x4096, 11008x4096, 4096x11008) x M in {1, 4, 16, 64, 512,
2048} x widths: the median device time of ``pallas_kernels.gpu.uniform`` (CUPTI kernel
time, all kernels of the call including the split-K sum; weight sets rotated so that
they do not stay in the 50 MB L2), effective bandwidth (bytes of codes + scales +
activations + output / time), its fraction of the copy bandwidth measured in the same
run, and speedups over XLA's bf16 matmul, over the jnp dequantize-then-matmul path
(``UniformWeight.linear``) and over qwix's int4 weight-only PTQ matmul (``qwix.quantize``
int4 with 128-row tiles, ``qwix.dot_general``; when qwix is importable) timed the same
way. Up to ``DECODE_M`` rows the decode kernel runs, above it the warp-specialized wide
kernel (``pallas_kernels/gpu/uniform_wide.py``); the table says which, with its tiles.
``--check`` first compares every kernel configuration with the float32 reference on
fresh random inputs (relative Frobenius error; bf16 operands give 1e-3..1e-2) and fails
on NaN or error above 2e-2.

    python benchmarks/kernels_gpu.py [--check] [--quick] [--bits 4 8] [--ms 1 16]
        [--out benchmarks/results/gpu]

qwix is pure Python: ``pip install --no-deps --target /tmp/qwix qwix-*.whl`` and
``PYTHONPATH=/tmp/qwix:.`` make it importable on a machine without a package index.

Writes ``kernels_gpu_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import package_version  # noqa: E402
from benchmarks.timing import device_us  # noqa: E402
from jaxquant.algorithms.rtn import rtn  # noqa: E402
from pallas_kernels.gpu import uniform as gu  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
MS = (1, 4, 16, 64, 512, 2048)


def kernel_tiles(m: int, g: gu.GpuUniformWeight) -> dict:
    """Which kernel :func:`gu.uniform_matmul` runs for ``m`` rows, with its tiles."""
    kind, tiles = gu.kernel_for(m, g)
    return dict(kernel=kind, tiles=list(tiles))


def qwix_matmul() -> Any:
    """``(quantize(w [N, K]) -> q, matmul(x, q))`` of qwix's int4 PTQ, or ``None``."""
    try:
        import qwix
    except ImportError:
        return None

    def quantize(w: jax.Array) -> Any:
        return qwix.quantize(w.T.astype(jnp.bfloat16), jnp.int4, channelwise_axes=(1,),
                             tiled_axes={0: 128}, scale_dtype=jnp.bfloat16)

    def matmul(x: jax.Array, q: Any) -> jax.Array:
        return qwix.dot_general(x, q, (((1,), (0,)), ((), ())))

    return quantize, matmul


def copy_gbps() -> float:
    arrays = [jnp.full((1 << 26,), i, jnp.float32) for i in range(4)]
    us = device_us(lambda a: a * 2, [(a,) for a in arrays])
    return 2 * arrays[0].nbytes / us / 1e3


def bf16_tflops() -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(8192, 8192)), jnp.bfloat16)
    us = device_us(lambda a, b: a @ b, [(a, a)])
    return 2 * 8192 ** 3 / us / 1e6


def check(rng: np.random.Generator) -> list[dict]:
    rows = []
    for (n, k), bits, group, sym in (((4096, 4096), 4, 128, False), ((11008, 4096), 3, 128, True),
                                     ((4096, 11008), 2, 128, False), ((576, 1536), 8, None, False),
                                     ((1536, 576), 4, 64, True), ((200, 700), 5, 64, False)):
        w = rtn(jnp.asarray(rng.normal(size=(n, k)), jnp.float32), bits=bits, group_size=group,
                symmetric=sym)
        gw = gu.relayout(w)
        for m in MS:
            x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
            y = np.asarray(gu.uniform_matmul(x, gw), np.float32)
            ref = np.asarray(gu.reference(x, w))
            err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            ok = bool(np.isfinite(y).all() and err < 2e-2)
            rows.append(dict(n=n, k=k, bits=bits, group=group, symmetric=sym, m=m, rel_err=err,
                             ok=ok, tiles=kernel_tiles(m, gw)))
            print(f"check {n}x{k} {bits}-bit g{group} M={m}: rel err {err:.1e} "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
    return rows


def write(out: Path, meta: dict, checks: list, rows: list, kind: str, echo: bool = False
          ) -> None:
    """JSON and markdown of what was measured so far (rewritten after every row)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_gpu_" + kind.lower().replace(" ", "_")
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, check=checks, rows=rows),
                                                 indent=1))
    lines = [f"# GPU dequant-matmul kernels: {meta['device']}, JAX {meta['jax']}", "",
             f"Measured in the same run: copy {meta['copy_gbps']:.0f} GB/s (read + write), "
             f"bf16 8192^3 matmul {meta['bf16_tflops']:.0f} TFLOP/s. Times: CUPTI device time "
             "of the whole call (kernel + split-K sum), median of 10, weight sets rotated past L2. "
             "Widths 1..3 are stored in bit planes (bits/8 bytes a code) and unpacked in "
             "registers by the decode kernel; the wide kernel reads them unpacked to the int4 "
             "container by XLA per call. "
             "Kernel: `decode` (pallas_kernels/gpu/uniform.py, tiles tm/split/steps) up to "
             f"M = {gu.DECODE_M}, `wide` (uniform_wide.py, tiles tt/tk/split/steps) above. "
             "qwix: "
             f"{meta.get('qwix') or 'not installed'}, int4 weight-only g128 "
             "(`qwix.quantize` + `qwix.dot_general`).", "",
             "| N x K | bits | M | kernel | us | GB/s | of copy | bf16 us | x bf16 | jnp us "
             "| x jnp | qwix us | x qwix |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tiles = f"{r['tiles']['kernel']} " + "/".join(map(str, r["tiles"]["tiles"]))
        qw = (f"{r['qwix_us']:.1f} | {r['speedup_qwix']:.2f}" if r.get("qwix_us")
              else "– | –")
        lines.append(f"| {r['n']}x{r['k']} | {r['bits']} | {r['m']} | {tiles} | "
                     f"{r['us']:.1f} | {r['gbps']:.0f} | {r['copy_frac']:.0%} | "
                     f"{r['bf16_us']:.1f} | {r['speedup_bf16']:.2f} | {r['jnp_us']:.1f} | "
                     f"{r['speedup_jnp']:.2f} | {qw} |")
    if checks:
        bad = [c for c in checks if not c["ok"]]
        lines += ["", f"Device check: {len(checks) - len(bad)}/{len(checks)} configurations "
                  f"within 2e-2 relative error (max {max(c['rel_err'] for c in checks):.1e})."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify against the reference")
    parser.add_argument("--quick", action="store_true", help="4-bit, M in {1, 16, 512}")
    parser.add_argument("--bits", type=int, nargs="*", help="widths (default 4 3 2 8)")
    parser.add_argument("--ms", type=int, nargs="*", help="activation rows (default all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        print("no GPU here: the benchmark needs one (tests run the kernels interpreted)")
        return
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    qx = qwix_matmul()
    meta = dict(device=dev.device_kind, jax=jax.__version__, copy_gbps=copy_gbps(),
                bf16_tflops=bf16_tflops(), decode_m=gu.DECODE_M,
                qwix=package_version("qwix") if qx else None)
    print(meta, flush=True)
    checks = check(rng) if args.check else []
    widths = args.bits or ((4,) if args.quick else (4, 3, 2, 8))
    ms = args.ms or ((1, 16, 512) if args.quick else MS)
    rows = []
    for n, k in SHAPES:
        wf = jnp.asarray(rng.normal(size=(n, k)), jnp.float32)
        reps = 8  # weight sets per timing: 8 x 8 MB int4 > the 50 MB L2
        bf = [jnp.asarray(rng.normal(size=(n, k)), jnp.bfloat16) for _ in range(reps)]
        for bits in widths:
            ws = [rtn(wf + i, bits=bits, group_size=128, symmetric=False) for i in range(reps)]
            gws = [gu.relayout(w) for w in ws]
            qws = [qx[0](wf + i) for i in range(reps)] if qx and bits == 4 else None
            for m in ms:
                x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
                t_bf16 = device_us(lambda x, w: x @ w.T, [(x, w) for w in bf])
                t_jnp = device_us(lambda x, w: w.linear(x), [(x, w) for w in ws])
                t_q = device_us(gu.uniform_matmul, [(x, g) for g in gws])
                t_qwix = device_us(qx[1], [(x, q) for q in qws]) if qws else None
                g = gws[0]
                byts = g.code_bytes + 2 * g.scales.nbytes + 2 * m * k + 2 * m * n
                bw = byts / t_q / 1e3
                row = dict(n=n, k=k, bits=bits, m=m, us=t_q, bf16_us=t_bf16, jnp_us=t_jnp,
                           gbps=bw, copy_frac=bw / meta["copy_gbps"],
                           speedup_bf16=t_bf16 / t_q, speedup_jnp=t_jnp / t_q,
                           qwix_us=t_qwix, speedup_qwix=t_qwix / t_q if t_qwix else None,
                           tiles=kernel_tiles(m, g), stored_bits=g.container)
                rows.append(row)
                print(f"{n}x{k} {bits}-bit M={m}: {t_q:.1f} us ({bw:.0f} GB/s, "
                      f"{row['copy_frac']:.0%} of copy) bf16 {t_bf16:.1f} us "
                      f"x{row['speedup_bf16']:.2f} jnp {t_jnp:.1f} us "
                      f"x{row['speedup_jnp']:.2f}", flush=True)
                write(Path(args.out), meta, checks, rows, dev.device_kind)
    write(Path(args.out), meta, checks, rows, dev.device_kind, echo=True)
    if checks and any(not c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
