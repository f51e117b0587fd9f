"""``jaxquant``: evaluate, convert and inspect LLM checkpoints in JAX.

Errors caused by input (paths, checkpoints, configs, flags, text) print one line,
``error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxquant.errors import DataError, JaxquantError, OutputExistsError

MODEL_HELP = ("smollm2-135m (embedded), a Hugging Face model directory, a .gguf file, "
              "or a jaxquant checkpoint directory")


def check_output(path: str | Path, *, force: bool) -> Path:
    """Checks before any work that ``path`` can be written: refuses to replace it without
    ``force``, and fails early when a parent is a file."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} exists; pass --force to replace it")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"output {path}: {parent} is not a directory")
            break
    return path


def write_json(path: str | Path, obj: Any, *, force: bool) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically; refuses to replace without ``force``."""
    path = check_output(path, force=force)
    if path.is_dir():
        raise OutputExistsError(f"output {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bits(value: str) -> int | float:
    """A bit width: an integer, or a fractional average (CLAQ) such as 2.1."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width, got {value!r}") from None
    return int(x) if x == int(x) else x


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _mesh(value: str) -> Any:
    """``--mesh data=D,model=M`` -> :class:`jaxquant.sharding.MeshConfig`."""
    from jaxquant.errors import MeshError
    from jaxquant.sharding import MeshConfig

    try:
        return MeshConfig.parse(value)
    except MeshError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_mesh(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--mesh", type=_mesh, metavar="data=D,model=M",
                   help=f"device mesh for {what}: D-way data parallel (windows split) times "
                        "M-way tensor parallel (weights split); the product must be the "
                        "device count; either part may be left out (default: every device "
                        "on data, model=1)")


def _add_model(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    else:
        p.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter and compute dtype (default: float32)")


def _add_no_kernels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-kernels", action="store_true",
                   help="run quantized layers on the jnp path, not the backend's Pallas "
                        "kernels (also: JAXQUANT_KERNELS=0)")


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of MODEL on a text (WikiText protocol of MISSION.md); with several
    processes (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a TPU pod
    slice) one evaluation over every host's devices, reported by process 0."""
    from jaxquant import distributed

    proc = distributed.initialize()  # before anything touches a device

    import jax

    from jaxquant.checkpoints.load import load_model, resolve

    resolve(args.model)
    if args.json:
        check_output(args.json, force=args.force)
    text = _eval_text(args)
    model = load_model(args.model, dtype=args.dtype, kernels=not args.no_kernels)
    windows = _windows(text, model.tokenizer, model.config.vocab_size, args)
    result = _perplexity(model.params, model.config, windows, args, f"{args.model} ({args.dtype})")
    report = {
        "model": args.model, "data": text.source, "data_format": text.format,
        "dtype": args.dtype, **result.to_dict(),
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
    }
    if not proc.is_main:  # every process computed the same result; process 0 reports it
        return 0
    print(f"ppl {result.ppl:.4f} over {result.windows} windows of {result.seq_len} tokens "
          f"({result.tokens} predicted) in {result.seconds:.1f} s "
          f"[{result.tokens_per_second:.0f} tok/s on {result.devices} {report['backend']} "
          f"device(s), mesh data={result.mesh['data']},model={result.mesh['model']}"
          f"{f', {result.processes} processes' if result.processes > 1 else ''}]")
    if args.json:
        write_json(args.json, report, force=args.force)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Converts MODEL to a jaxquant (Orbax) checkpoint directory."""
    from jaxquant.checkpoints.jq_checkpoint import save_checkpoint
    from jaxquant.checkpoints.load import load_model, resolve

    resolve(args.model)
    out = check_output(args.out, force=args.force)
    model = load_model(args.model, dtype=args.dtype, kernels=False)
    save_checkpoint(out, config=model.config, params=model.params, tokenizer=model.tokenizer,
                    metadata={"source": model.source, "source_format": model.source_format},
                    force=args.force)
    print(f"wrote {out} ({model.config.family}, {model.config.num_params():,} parameters, "
          f"{args.dtype})")
    return 0


class _Text(str):
    """Evaluation text that remembers where it came from."""

    source: str
    format: str


def _eval_text(args: argparse.Namespace) -> _Text:
    """Reads ``--data`` (default: the demo corpus's Old Testament) before any model is loaded."""
    from jaxquant.data import DEMO_CORPORA, load_text

    data = args.data or "kjv-ot"
    fmt = args.data_format or ("plain" if data in DEMO_CORPORA else "wikitext")
    text = _Text(load_text(data, fmt))
    text.source, text.format = str(data), fmt
    return text


def _windows(text: str, tokenizer: Any, vocab_size: int, args: argparse.Namespace) -> Any:
    """Token windows of ``text`` as the evaluation protocol cuts them."""
    from jaxquant.data import make_windows, tokenize

    ids = tokenize(tokenizer, text)
    if len(ids) and int(ids.max()) >= vocab_size:
        raise DataError(f"the tokenizer produced id {int(ids.max())}, but the model has only "
                        f"{vocab_size} embeddings: tokenizer and model do not match")
    return make_windows(ids, args.seq_len, args.max_windows)


def _perplexity(params: Any, cfg: Any, windows: Any, args: argparse.Namespace, label: str):
    from jaxquant.eval import evaluate_perplexity

    try:
        return evaluate_perplexity(params, cfg, windows, batch_size=args.batch_size,
                                   progress=not args.quiet, mesh=getattr(args, "mesh", None))
    except FloatingPointError as e:
        raise JaxquantError(f"{label}: {e}") from e


def _same_text(a: str, b: str) -> bool:
    """Whether two ``--calib`` / ``--data`` sources overlap (same file or demo part)."""
    from jaxquant.data import DEMO_CORPORA, DEMO_CORPUS

    if a in DEMO_CORPORA or b in DEMO_CORPORA:
        return a == b or ({a, b} <= set(DEMO_CORPORA) and DEMO_CORPUS in (a, b))
    try:
        pa, pb = Path(a).resolve(), Path(b).resolve()
    except OSError:
        return False
    return pa == pb or pa in pb.parents or pb in pa.parents


def _weight_spec(args: argparse.Namespace) -> Any:
    """The weight quantization of ``quantize`` (None: ``--method none``, float weights)."""
    from jaxquant.recipes import QuantSpec

    if args.method == "none":
        if args.bits not in (None, 16):
            raise JaxquantError("--method none keeps the weights in float: use --bits 16 "
                                "(or leave --bits out)")
        return None
    if args.bits == 16:
        raise JaxquantError("--bits 16 keeps float weights: use --method none")
    group_size = args.group_size
    if group_size is None and args.method != "claq":
        group_size = 128
    return QuantSpec(method="rtn" if args.method == "awq" else args.method,
                     bits=4 if args.bits is None else args.bits,
                     group_size=None if args.per_channel else group_size,
                     symmetric=args.sym, scale_dtype=args.scale_dtype,
                     act_order=args.act_order, static_groups=args.static_groups,
                     damp=args.damp, mse=args.mse, salience_weight=args.salience_weight,
                     lwc_epochs=args.lwc_epochs, lwc_lr=args.lwc_lr,
                     lwc_dtype=args.lwc_dtype, outlier_ratio=args.outlier_ratio,
                     adaptive=not args.no_adaptive, kmeans=not args.no_kmeans,
                     total_bits=args.total_bits)


def _runtime(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(ActQuantConfig | None, TransformConfig)`` from the activation flags."""
    from jaxquant.algorithms.act_quant import ActQuantConfig
    from jaxquant.transforms.pipeline import TransformConfig

    act = None
    if args.act_bits is not None:
        clip = args.act_clip if args.act_clip is not None else (0.9 if args.act_bits <= 4
                                                                 else 1.0)
        try:
            act = ActQuantConfig(bits=args.act_bits, symmetric=not args.act_asym,
                                 clip_ratio=clip)
        except ValueError as e:
            raise JaxquantError(f"--act-bits/--act-clip: {e}") from e
    elif args.act_clip is not None or args.act_asym:
        raise JaxquantError("--act-clip and --act-asym need --act-bits")
    if args.alpha is not None and args.alpha_search:
        raise JaxquantError("give either --alpha or --alpha-search")
    if (args.alpha is not None or args.alpha_search) and args.transform not in ("smooth",
                                                                                "smoothrot"):
        raise JaxquantError("--alpha/--alpha-search set SmoothQuant's strength: use them "
                            "with --transform smooth or smoothrot")
    wbits = 16 if args.method == "none" else int(args.bits or 4)
    tcfg = TransformConfig(kind=args.transform,
                           alpha=None if args.alpha_search else (
                               0.5 if args.alpha is None else args.alpha),
                           seed=args.rotation_seed,
                           act_bits=args.act_bits or 16, weight_bits=min(wbits, 16))
    return act, tcfg


def _describe(spec: Any, act: Any, kv_bits: int | None, transform: str, awq: bool) -> str:
    parts = ["float weights" if spec is None else spec.describe().replace(
        "rtn", "awq+rtn" if awq else "rtn", 1)]
    if transform != "none":
        parts.append(transform)
    if act is not None:
        parts.append(f"A{act.bits}")
    if kv_bits:
        parts.append(f"KV{kv_bits}")
    return " ".join(parts)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantizes MODEL: weights (RTN, GPTQ, SliM-LLM, CLAQ, AWQ), optionally after a
    smoothing/rotation transform and with activation and KV-cache quantization; saves it
    and compares perplexity."""
    import dataclasses
    import time

    import jax
    import jax.numpy as jnp

    from jaxquant.backends import prepare
    from jaxquant.calibration import Calibration
    from jaxquant.checkpoints.jq_checkpoint import save_checkpoint
    from jaxquant.checkpoints.load import load_model, resolve
    from jaxquant.data import load_text, sample_windows, tokenize
    from jaxquant.formats.base import tree_nbytes
    from jaxquant.quantize import quantization_report, quantize
    from jaxquant.recipes import CALIBRATED, MIXED, Recipe
    from jaxquant.transforms.pipeline import apply_transform, check_transform

    resolve(args.model)
    spec = _weight_spec(args)
    act, tcfg = _runtime(args)
    mesh = None
    if args.mesh is not None:
        from jaxquant.sharding import make_mesh

        mesh = make_mesh(args.mesh, jax.local_devices())
    if spec is None and args.transform == "none" and act is None and not args.kv_bits:
        raise JaxquantError("--method none quantizes nothing: add --transform, --act-bits "
                            "or --kv-bits")
    if args.bit_map and (spec is None or spec.method not in MIXED):
        raise JaxquantError("--bit-map draws mixed-precision bit maps: use --method slim "
                            "or slim+")
    recipe = None
    if spec is not None:
        recipe = Recipe.uniform(spec, args.pattern) if args.pattern else Recipe.uniform(spec)
    elif args.pattern:
        raise JaxquantError("--pattern selects weights to quantize: not with --method none")
    for out in (args.out, args.json, args.bit_map):
        if out:
            check_output(out, force=args.force)
    text = _eval_text(args) if args.eval else None
    calib_text = None
    needs_calib = [why for why, on in (
        (f"--method {args.method}", args.method in (*CALIBRATED, "awq")),
        (f"--transform {args.transform}", tcfg.smooths)) if on]
    if needs_calib:
        if not args.calib:
            raise JaxquantError(f"{needs_calib[0]} needs calibration text: --calib PATH "
                                "(or --calib kjv-nt, the demo corpus's New Testament)")
        calib_text = load_text(args.calib, args.calib_format)
        if text is not None and _same_text(args.calib, text.source):
            print(f"warning: calibrating on the evaluation text ({args.calib}): the "
                  "perplexity will be optimistic (calibrate on kjv-nt and evaluate on "
                  "kjv-ot, or on disjoint files)", file=sys.stderr)
    # With a mesh the float model stays in host memory and calibration streams one block
    # at a time to the devices: the model may be larger than one device.
    model = load_model(args.model, dtype=args.dtype, kernels=False, host=mesh is not None)
    check_transform(model.params, model.config, tcfg)
    specs, unused = recipe.plan(_paths(model.params)) if recipe else ({}, [])
    if recipe is not None and not specs:
        raise JaxquantError(f"the recipe matches no parameter of {args.model}")
    windows = None
    if calib_text is not None:
        ids = tokenize(model.tokenizer, calib_text)
        windows = sample_windows(ids, args.calib_seq_len, args.calib_windows,
                                 seed=args.calib_seed)  # raises when shorter than one
        asked = args.calib_windows * args.calib_seq_len
        if len(ids) < asked:
            print(f"warning: the calibration text has {len(ids)} tokens, fewer than the "
                  f"{args.calib_windows} x {args.calib_seq_len} = {asked} asked for; the "
                  "random windows will overlap (use more text for a better calibration)",
                  file=sys.stderr)
    start = time.perf_counter()
    params, cfg, tinfo = apply_transform(model.params, model.config, tcfg, windows)
    if args.method == "awq":
        from jaxquant.transforms.awq import awq

        params = awq(params, cfg, windows, bits=spec.bits, group_size=spec.group_size,
                     symmetric=spec.symmetric, scale_dtype=jnp.dtype(spec.scale_dtype),
                     batch_size=args.calib_batch_size, progress=not args.quiet)
    prep_seconds = time.perf_counter() - start  # transforms and AWQ: calibration work too
    stats: dict[str, Any] = {}
    qparams = params
    if recipe is not None:
        calibration = None
        if spec.method in CALIBRATED:
            calibration = Calibration(
                config=cfg, batch_size=args.calib_batch_size, progress=not args.quiet,
                true_sequential=args.true_sequential, windows=windows, mesh=mesh,
                stream=mesh is not None)
        qparams, stats = quantize(params, recipe, calibration, return_stats=True)
    cfg = dataclasses.replace(cfg, act_quant=act, kv_bits=args.kv_bits)
    qparams = jax.block_until_ready(qparams)
    seconds = time.perf_counter() - start
    report = quantization_report(params, qparams)  # errors against the transformed weights
    report["float_bytes"] = tree_nbytes(model.params)
    float_bits = 8 * report["float_bytes"] / model.config.num_params()
    if report["avg_bits"] is None:  # --method none: float weights
        report["avg_bits"] = float_bits
    label = _describe(spec, act, args.kv_bits, args.transform, args.method == "awq")
    summary = {
        "model": args.model, "method": args.method, "bits": spec.bits if spec else 16,
        "group_size": spec.group_size if spec else None,
        "symmetric": spec.symmetric if spec else None,
        "scale_dtype": spec.scale_dtype if spec else None,
        "recipe": recipe.to_dict() if recipe else None, "label": label,
        "activations": None if act is None else dataclasses.asdict(act),
        "kv_bits": args.kv_bits, **tinfo,
        "unused_rules": [r.pattern for r in unused], "seconds": seconds, **report,
    }
    if windows is not None:
        summary["calibration"] = {"data": str(args.calib), "windows": args.calib_windows,
                                  "seq_len": args.calib_seq_len, "seed": args.calib_seed,
                                  "true_sequential": args.true_sequential,
                                  "seconds": prep_seconds + stats.get("seconds", 0.0)}
        for path, st in stats.get("layers", {}).items():
            summary["layers"][path].update({f"calibration_{k}": v for k, v in st.items()})
        if "blocks" in stats:
            summary["calibration"]["blocks"] = {str(k): v for k, v in stats["blocks"].items()}
    print(f"{label}: {report['quantized_layers']} layers, "
          f"{report['avg_bits']:.3f} bits/weight, model {report['float_bytes'] / 2**20:.1f} MiB "
          f"-> {report['quantized_bytes'] / 2**20:.1f} MiB in {seconds:.1f} s")
    if act is not None and act.bits < 8:
        print(f"note: {act.bits}-bit activations are emulated (quantized, then multiplied in "
              "float) except with symmetric per-channel weights, which take an int8 dot")
    for rule in unused:
        print(f"warning: rule {rule.pattern!r} matched no parameter", file=sys.stderr)
    if args.bit_map:
        from jaxquant.eval.plots import plot_bit_allocation

        plot_bit_allocation(qparams, args.bit_map, title=f"{args.model}: {label}")
        print(f"wrote {args.bit_map}")
    if args.out:
        meta = {"source": model.source, "source_format": model.source_format,
                "quantization": {k: summary[k] for k in (
                    "recipe", "label", "transform", "activations", "kv_bits", "avg_bits",
                    "quantized_bytes", "float_bytes")}}
        save_checkpoint(args.out, config=cfg, params=qparams,
                        tokenizer=model.tokenizer, metadata=meta, force=args.force)
        print(f"wrote {args.out}")
    if text is not None:
        windows = _windows(text, model.tokenizer, model.config.vocab_size, args)
        rows = []
        for row_label, params, row_cfg, bits, size in (
                (args.dtype, model.params, model.config, float_bits, report["float_bytes"]),
                (label, prepare(qparams, cfg, kernels=not args.no_kernels), cfg,
                 report["avg_bits"], report["quantized_bytes"])):
            res = _perplexity(params, row_cfg, windows, args, row_label)
            rows.append({"model": row_label, "bits_per_weight": bits, "bytes": size,
                         "ppl": res.ppl, "windows": res.windows, "tokens": res.tokens,
                         "seconds": res.seconds})
        summary["eval"] = {"data": text.source, "data_format": text.format,
                           "seq_len": args.seq_len, "rows": rows}
        print(f"\nperplexity on {text.source} ({rows[0]['windows']} windows of "
              f"{args.seq_len} tokens)")
        print(f"| {'model':<26} | bits/weight (linear) | size (MiB) | ppl |")
        print(f"|{'-' * 28}|---|---|---|")
        for row in rows:
            print(f"| {row['model']:<26} | {row['bits_per_weight']:.3f} | "
                  f"{row['bytes'] / 2**20:.1f} | {row['ppl']:.3f} |")
    if args.json:
        write_json(args.json, summary, force=args.force)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Quantization difficulty of every linear layer's input and weight, per transform:
    a JSON report and PNG plots (Czakó, Kertész, Szénási, SACI 2025)."""
    from jaxquant.checkpoints.jq_checkpoint import atomic_output_dir
    from jaxquant.checkpoints.load import load_model, resolve
    from jaxquant.data import load_text, sample_windows, tokenize
    from jaxquant.eval.analysis import analyze, write_report
    from jaxquant.eval.analysis_plots import plot_all
    from jaxquant.transforms.pipeline import TransformConfig, apply_transform, check_transform

    resolve(args.model)
    check_output(args.out, force=args.force)
    kinds = list(dict.fromkeys(args.transform or ["none", "smooth", "rotate", "smoothrot"]))
    tcfgs = {k: TransformConfig(kind=k, alpha=args.alpha) for k in kinds}
    calib = load_text(args.calib, args.calib_format)
    model = load_model(args.model, dtype=args.dtype, kernels=False)
    for tcfg in tcfgs.values():
        check_transform(model.params, model.config, tcfg)
    ids = tokenize(model.tokenizer, calib)
    windows = sample_windows(ids, args.calib_seq_len, args.calib_windows, seed=args.calib_seed)
    variants = {}
    for kind, tcfg in tcfgs.items():
        params, cfg, _ = apply_transform(model.params, model.config, tcfg, windows)
        variants[kind] = (params, cfg)
    report = analyze(variants, windows, act_bits=args.act_bits, weight_bits=args.weight_bits,
                     layers=args.layers, sample_tokens=args.sample_tokens,
                     batch_size=args.calib_batch_size, progress=not args.quiet)
    report["settings"].update({"model": args.model, "calib": str(args.calib),
                               "alpha": args.alpha})
    with atomic_output_dir(args.out, force=args.force) as tmp:
        write_report(report, tmp)
        plots = plot_all(report, tmp)
    print(f"{'transform':<10} {'mean act metric':>16} {'mean weight metric':>19} "
          f"{'rel. layer error':>17} {'(estimate)':>11}")
    for kind, v in report["variants"].items():
        sm = v["summary"]
        print(f"{kind:<10} {sm['mean_act_metric']:>16.4g} {sm['mean_weight_metric']:>19.4g} "
              f"{sm['mean_relative_error']:>17.4g} {sm['mean_relative_error_estimate']:>11.4g}")
    print(f"wrote {args.out}/analysis.json and {len(plots)} plots "
          f"(W{args.weight_bits}A{args.act_bits} layer errors)")
    return 0


def _paths(params: Any) -> list[str]:
    from jaxquant.params import flatten

    return list(flatten(params))


def cmd_generate(args: argparse.Namespace) -> int:
    """Greedy generation from MODEL (float or quantized) with the KV cache."""
    from jaxquant.checkpoints.load import load_model, resolve
    from jaxquant.data import tokenize
    from jaxquant.generate import greedy_generate

    resolve(args.model)
    model = load_model(args.model, dtype=args.dtype, kernels=not args.no_kernels)
    prompt = tokenize(model.tokenizer, args.prompt)
    if prompt.size == 0:
        raise DataError("the prompt is empty after tokenization")
    stop = () if model.config.eos_token_id is None else (model.config.eos_token_id,)
    ids = greedy_generate(model.params, model.config, prompt,
                          max_new_tokens=args.max_new_tokens, stop_ids=stop)
    print(args.prompt + model.tokenizer.decode(ids))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Architecture, parameter count and sizes of MODEL, without loading its weights."""
    from jaxquant.checkpoints.info import model_info

    if args.json:
        check_output(args.json, force=args.force)
    info = model_info(args.model)
    if args.json:
        write_json(args.json, info, force=args.force)
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jaxquant`` command."""
    parser = argparse.ArgumentParser(prog="jaxquant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from jaxquant.recipes import QuantSpec

    p = sub.add_parser("eval", help="perplexity of a model on a text",
                       description=cmd_eval.__doc__)
    _add_model(p)
    p.add_argument("--data", metavar="PATH",
                   help="text file or folder of .txt files, or a part of the embedded King "
                        "James Bible demo corpus: kjv-ot (default, Old Testament), kjv-nt "
                        "(New Testament), kjv (both)")
    p.add_argument("--data-format", choices=["wikitext", "plain"],
                   help="wikitext: drop empty lines, join rows with blank lines (default for "
                        "--data); plain: text as is (default for the demo corpus)")
    p.add_argument("--seq-len", type=_positive, default=2048, help="window length (2048)")
    p.add_argument("--max-windows", type=_positive, help="score only the first N windows")
    p.add_argument("--batch-size", type=_positive, default=1,
                   help="windows per step, split over the data axis of the mesh (1)")
    _add_mesh(p, "the evaluation")
    p.add_argument("--json", metavar="OUT", help="write a JSON report here")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_no_kernels(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="convert a checkpoint to a jaxquant checkpoint",
                       description=cmd_convert.__doc__)
    _add_model(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="quantize a model (RTN), save it, compare perplexity",
                       description=cmd_quantize.__doc__)
    _add_model(p)
    p.add_argument("--method", default="rtn",
                   choices=["rtn", "gptq", "slim", "slim+", "claq", "awq", "none"],
                   help="rtn (no data); gptq, slim (SliM-LLM mixed precision), slim+ "
                        "(SliM-LLM+ learned clipping), claq (CLAQ per-column K-Means "
                        "codebooks) or awq (activation-aware scales, then RTN) need --calib; "
                        "none: float weights (--bits 16), with --transform / --act-bits")
    p.add_argument("--bits", type=_bits, default=None,
                   help="code width, 2 to 8 (4); claq: an average such as 2.1 or 3.12; "
                        "16 with --method none")
    p.add_argument("--act-bits", type=int, metavar="A",
                   help="quantize every block linear layer's input per token to A bits "
                        "(8: W8A8 with an int8 dot for symmetric per-channel weights; 4: "
                        "W4A4, emulated where no int4 matmul exists)")
    p.add_argument("--act-clip", type=float, metavar="C",
                   help="activation range = C * max|x| per token (default 0.9 for 4 bits "
                        "or fewer, else 1.0)")
    p.add_argument("--act-asym", action="store_true",
                   help="asymmetric activation codes (zero point per token; no int8 dot)")
    p.add_argument("--kv-bits", type=int, choices=range(2, 9), metavar="K",
                   help="quantize the KV cache per token and head to K bits (asymmetric)")
    p.add_argument("--transform", default="none",
                   choices=["none", "smooth", "rotate", "smoothrot"],
                   help="before quantizing: smooth (SmoothQuant), rotate (QuaRot Hadamards, "
                        "with online Hadamards in the forward) or smoothrot (smooth the "
                        "down_proj input, then rotate); smooth* need --calib")
    p.add_argument("--alpha", type=float,
                   help="SmoothQuant migration strength in [0, 1] (0.5)")
    p.add_argument("--alpha-search", action="store_true",
                   help="search alpha per layer (grid 0..1, step 0.05) for the smallest "
                        "quantized layer error at the chosen --bits/--act-bits")
    p.add_argument("--rotation-seed", type=int, default=0,
                   help="seed of the random Hadamard signs (0)")
    p.add_argument("--group-size", type=_positive, default=None,
                   help="input channels per scale and zero (128; claq: none, per column)")
    p.add_argument("--per-channel", action="store_true",
                   help="one scale per output channel instead of groups")
    p.add_argument("--sym", action="store_true", help="symmetric: no zero points stored")
    p.add_argument("--scale-dtype", default="bfloat16",
                   choices=["bfloat16", "float16", "float32"], help="scale/zero dtype")
    p.add_argument("--act-order", action="store_true",
                   help="gptq: columns by decreasing Hessian diagonal")
    p.add_argument("--static-groups", action="store_true",
                   help="gptq: group scales from the float weights, found up front")
    p.add_argument("--mse", action="store_true",
                   help="gptq: search each group's range (shrink 1..0.21, |err|^2.4)")
    p.add_argument("--salience-weight", type=float, default=QuantSpec.salience_weight,
                   help="slim: SQC error weight of salient weights (reference: 1)")
    p.add_argument("--lwc-epochs", type=_positive, default=QuantSpec.lwc_epochs,
                   help="slim+: training passes over the calibration batches per block")
    p.add_argument("--lwc-lr", type=float, default=QuantSpec.lwc_lr,
                   help="slim+: AdamW learning rate of the clipping parameters")
    p.add_argument("--lwc-dtype", choices=("float32", "bfloat16"), default=QuantSpec.lwc_dtype,
                   help="slim+: compute dtype of the training passes (bfloat16: faster on "
                        "GPU/TPU; the parameters and the loss stay float32)")
    p.add_argument("--outlier-ratio", type=float, default=QuantSpec.outlier_ratio,
                   help="claq: fraction of weights kept in float, largest per column "
                        "(0.005 ~ 0.5%%; 0: off)")
    p.add_argument("--no-adaptive", action="store_true",
                   help="claq: every column at the same width (ablation of adaptive precision)")
    p.add_argument("--total-bits", action="store_true",
                   help="claq: --bits is the average of everything stored per weight (codes, "
                        "codebooks, permutation, float outliers), not the code width")
    p.add_argument("--no-kmeans", action="store_true",
                   help="claq: evenly spaced levels instead of K-Means (ablation)")
    p.add_argument("--true-sequential", action="store_true",
                   help="collect each layer's inputs after the layers before it in its "
                        "block are quantized (q/k/v, o, gate/up, down)")
    p.add_argument("--bit-map", metavar="PNG",
                   help="slim/slim+: draw each layer's bit allocation into this PNG")
    p.add_argument("--damp", type=float, default=0.01,
                   help="gptq: relative Hessian damping (0.01), raised on failure")
    p.add_argument("--calib", metavar="PATH",
                   help="calibration text file or folder of .txt, or kjv-nt (the demo "
                        "corpus's New Testament, disjoint from the default evaluation text)")
    p.add_argument("--calib-format", default="wikitext", choices=["wikitext", "plain"],
                   help="as --data-format (the demo corpus parts are read as they are)")
    p.add_argument("--calib-windows", type=_positive, default=128,
                   help="random calibration windows (128)")
    p.add_argument("--calib-seq-len", type=_positive, default=2048,
                   help="tokens per calibration window (2048)")
    p.add_argument("--calib-batch-size", type=_positive, default=8,
                   help="calibration windows per forward step (8)")
    p.add_argument("--calib-seed", type=int, default=0,
                   help="seed of the window sampling (0, as the GPTQ reference)")
    _add_mesh(p, "calibration (activations split over data, Hessians all-reduced, each "
                 "block's weights split over model, finished blocks moved to the host) and "
                 "--eval")
    p.add_argument("--pattern", metavar="REGEX",
                   help="parameter paths to quantize (default: every linear layer of "
                        "every block)")
    p.add_argument("--out", metavar="DIR", help="save the quantized checkpoint here")
    p.add_argument("--json", metavar="OUT", help="write a JSON report here")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument("--eval", action="store_true",
                   help="evaluate float and quantized perplexity and print the table")
    p.add_argument("--data", metavar="PATH",
                   help="evaluation text for --eval (default: kjv-ot, the demo corpus's Old "
                        "Testament)")
    p.add_argument("--data-format", choices=["wikitext", "plain"])
    p.add_argument("--seq-len", type=_positive, default=2048)
    p.add_argument("--max-windows", type=_positive)
    p.add_argument("--batch-size", type=_positive, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_no_kernels(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("analyze", help="quantization difficulty per layer and transform, "
                       "with plots", description=cmd_analyze.__doc__)
    _add_model(p)
    p.add_argument("--transform", action="append",
                   choices=["none", "smooth", "rotate", "smoothrot"],
                   help="a transform to compare (repeat; default: all four)")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant strength (0.5)")
    p.add_argument("--act-bits", type=int, default=4, help="activation bits of the layer "
                   "error (4)")
    p.add_argument("--weight-bits", type=int, default=4, help="weight bits of the layer "
                   "error (4)")
    p.add_argument("--layers", type=int, nargs="+", metavar="I",
                   help="analyze only these blocks (default: all)")
    p.add_argument("--calib", default="kjv-nt", metavar="PATH",
                   help="text the activations come from (default: kjv-nt, the demo "
                        "corpus's New Testament)")
    p.add_argument("--calib-format", default="wikitext", choices=["wikitext", "plain"])
    p.add_argument("--calib-windows", type=_positive, default=8,
                   help="random windows of the text (8)")
    p.add_argument("--calib-seq-len", type=_positive, default=2048)
    p.add_argument("--calib-batch-size", type=_positive, default=4)
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--sample-tokens", type=_positive, default=2048,
                   help="input rows per layer the metrics are computed on (2048)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: analysis.json and PNG plots")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("generate", help="greedy text generation with the KV cache",
                       description=cmd_generate.__doc__)
    _add_model(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=_positive, default=32)
    _add_no_kernels(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="architecture, parameter count and bytes of a model",
                       description=cmd_info.__doc__)
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--json", metavar="OUT", help="also write the facts as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxquant`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JaxquantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output or input the OS refused (permissions, full disk, ...)
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
