"""Sharded evaluation and calibration on simulated CPU devices, and multi-process runs.

The 8-device checks run in one child process (``tests/sharding_child.py``), since this
process's JAX has already started with one device; the two-process evaluation runs
two children (``tests/multihost_child.py``) joined by a coordinator on localhost.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.cli.main import main
from jaxquant.distributed import DistributedError, initialize
from jaxquant.errors import MeshError
from jaxquant.eval import evaluate_perplexity
from jaxquant.sharding import MeshConfig
from tests.test_cli_errors import assert_error, run
from tests.tiny_sharded import MESHES, multihost_case

ROOT = Path(__file__).resolve().parents[1]


def _child(module: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module], cwd=str(ROOT), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})


def _result(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------
# Mesh shapes and errors (this process).


def test_mesh_config_parse():
    assert MeshConfig.parse("data=4,model=2") == MeshConfig(data=4, model=2)
    assert MeshConfig.parse(" model = 2 ") == MeshConfig(data=None, model=2)
    assert MeshConfig.parse("data=8") == MeshConfig(data=8, model=1)
    assert MeshConfig.parse("model=2").resolve(8) == MeshConfig(data=4, model=2)
    assert MeshConfig().resolve(3) == MeshConfig(data=3, model=1)
    assert str(MeshConfig(data=2, model=4)) == "data=2,model=4"


@pytest.mark.parametrize("text, fragment", [
    ("data=4,tensor=2", "unknown axis 'tensor'"),
    ("data=four", "must be a positive integer, got 'four'"),
    ("data=0", "must be a positive integer, got 0"),
    ("data=2,data=2", "given twice"),
    ("4x2", "expected AXIS=SIZE"),
])
def test_mesh_config_parse_errors(text, fragment):
    with pytest.raises(MeshError, match=fragment):
        MeshConfig.parse(text)


def test_mesh_config_device_count_errors():
    with pytest.raises(MeshError, match="has 6 devices, but 8 are available"):
        MeshConfig(data=3, model=2).resolve(8)
    with pytest.raises(MeshError, match="model=3 does not divide the 8 devices"):
        MeshConfig(model=3).resolve(8)


def test_evaluate_perplexity_mesh_mismatch_is_a_clear_error():
    params, cfg, windows = multihost_case()
    with pytest.raises(MeshError, match="data=2,model=1 has 2 devices, but 1 are"):
        evaluate_perplexity(params, cfg, windows, mesh=MeshConfig(data=2), progress=False)


def test_cli_mesh_flag(tiny_hf_dir, tmp_path, capsys):
    from tests.test_cli_errors import _with_word_tokenizer

    with pytest.raises(SystemExit) as exc:
        run(["eval", "--model", "smollm2-135m", "--mesh", "data=2,model=x"], capsys)
    assert exc.value.code == 2
    assert "size of model must be a positive integer, got 'x'" in capsys.readouterr().err
    d = _with_word_tokenizer(tiny_hf_dir, tmp_path / "m", 97)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 97}" for i in range(300)))
    evaluate = ["eval", "--model", d, "--data", text, "--data-format", "plain",
                "--seq-len", "16", "--max-windows", "2", "--quiet"]
    code, err = run([*evaluate, "--mesh", "data=2,model=2"], capsys)
    assert_error(code, err, "mesh data=2,model=2 has 4 devices, but 1 are available")
    code = main([str(a) for a in [*evaluate, "--mesh", "model=1"]])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "mesh data=1,model=1" in out.out
    # quantize: calibration on the mesh (streamed), then --eval on it.
    quant = ["quantize", "--model", d, "--method", "gptq", "--group-size", "16", "--calib",
             text, "--calib-format", "plain", "--calib-windows", "2", "--calib-seq-len",
             "32", "--eval", "--data", text, "--data-format", "plain", "--seq-len", "32",
             "--quiet"]
    code, err = run([*quant, "--mesh", "model=2"], capsys)
    assert_error(code, err, "mesh model=2 does not divide the 1 devices")
    report = tmp_path / "r.json"
    code = main([str(a) for a in [*quant, "--mesh", "data=1", "--json", report]])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(report.read_text())["eval"]["rows"]
    assert all(math.isfinite(r["ppl"]) for r in rows)
    # With a mesh the float model stays on the host (streamed a block at a time); the
    # result is the one-device quantization's.
    code = main([str(a) for a in [*quant, "--json", report, "--force"]])
    assert code == 0, capsys.readouterr().err
    again = json.loads(report.read_text())["eval"]["rows"]
    assert [r["ppl"] for r in again] == pytest.approx([r["ppl"] for r in rows], rel=1e-5)
    from jaxquant.checkpoints.load import load_model

    on_host, on_device = (load_model(d, dtype="bfloat16", host=h).params for h in (True, False))
    for a, b in zip(jax.tree.leaves(on_host), jax.tree.leaves(on_device), strict=True):
        assert isinstance(a, np.ndarray) and a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(a, np.asarray(b))


def test_distributed_initialize_reads_the_environment():
    assert initialize(env={}).process_count == 1
    assert initialize(env={"JAXQUANT_DISTRIBUTED": "0",
                           "JAX_COORDINATOR_ADDRESS": "localhost:1"}).how == "single"
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES must be too"):
        initialize(env={"JAX_COORDINATOR_ADDRESS": "localhost:1"})
    with pytest.raises(DistributedError, match="JAX_PROCESS_ID=2 must lie in"):
        initialize(env={"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2",
                        "JAX_PROCESS_ID": "2"})
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES must be an integer"):
        initialize(env={"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two",
                        "JAX_PROCESS_ID": "0"})


# ----------------------------------------------------------------------------------------
# 8 simulated devices (one child process).


@pytest.fixture(scope="module")
def eight():
    return _result(_child("tests.sharding_child"))


def test_every_format_is_in_a_column_and_a_row_position(eight):
    kinds = eight["formats"]
    layout = eight["meshes"]["2x4"]["layout"]
    seen = {(k, "row" if ("o_proj" in p or "down_proj" in p) else "column")
            for p, k in kinds.items()}
    for k in ("uniform", "codebook", "mixed(uniform)", "outliers(mixed(codebook))"):
        assert (k, "column") in seen and (k, "row") in seen, (k, sorted(seen))
    # Row-parallel where the packing allows it, the documented fallbacks elsewhere.
    assert layout["layers.0.mlp.down_proj.weight"] == "row"  # uniform g32: scales split
    assert layout["layers.2.self_attn.o_proj.weight"] == "row; scales replicated"
    assert layout["layers.0.self_attn.o_proj.weight"] == "row"  # codebook
    assert layout["layers.1.mlp.down_proj.weight"].startswith("column (fallback")  # mixed
    assert layout["layers.1.self_attn.o_proj.weight"] == (
        "column (fallback: input axis does not split); outliers replicated")
    assert layout["layers.0.self_attn.q_proj.weight"] == "column"
    assert layout["lm_head.weight"] == layout["embed_tokens.weight"] == "column"
    assert layout["norm.weight"] == "replicated"
    split = eight["meshes"]["2x4"]["split"]
    assert split["layers.0.mlp.down_proj.weight"] == [[None, "model"]] * 3  # plane, s, z
    assert split["layers.0.self_attn.o_proj.weight"] == [[None, "model"]] * 2 + [
        ["model", None]]  # planes by column, codebook by row (its input channels)
    assert split["layers.0.self_attn.q_proj.weight"][-1] == []  # codebook replicated
    # model=8: 128 inputs / 8 = 16 codes, not a whole word: uniform rows fall back.
    wide = eight["meshes"]["1x8"]["layout"]
    assert wide["layers.0.mlp.down_proj.weight"] == "row"  # 256 / 8 = 32
    assert wide["layers.2.self_attn.o_proj.weight"].startswith("column (fallback")


@pytest.mark.parametrize("mesh", [f"{d}x{m}" for d, m in MESHES])
def test_sharded_perplexity_equals_single_device(eight, mesh):
    got, want = eight["meshes"][mesh], eight["single"]
    d, m = (int(x) for x in mesh.split("x"))
    assert got["mesh"] == {"data": d, "model": m} and got["devices"] == 8
    assert got["batch_size"] % d == 0
    assert math.isclose(got["ppl"], want["ppl"], rel_tol=1e-5)
    np.testing.assert_allclose(got["window_nll"], want["window_nll"], rtol=1e-5)


@pytest.mark.parametrize("mesh", [f"{d}x{m}" for d, m in MESHES] + ["1x8"])
def test_sharded_quantized_logits_equal_single_device(eight, mesh):
    assert eight["meshes"][mesh]["logits_maxdiff"] <= 1e-5 * eight["logits_absmax"]


def test_sharded_streaming_calibration_gives_the_same_weights(eight):
    cal = eight["calibration"]
    assert eight["hessian_all_reduce"]  # X^T X summed over the data axis inside the jit
    assert cal["on_host"]  # layer streaming: finished layers moved to the host
    for path, d in cal["diffs"].items():
        if d["method"] == "rtn":  # no calibration data: the same codes in every block
            assert d["mismatch"] == 0, (path, d)
        elif not path.startswith("layers.0."):
            # Later blocks see inputs through quantized block 0, where a few codebook
            # codes may differ (below); GPTQ's act-order and K-Means amplify that into
            # other codes, so the quantization must be as good, not bit-identical (the
            # all-reduced Hessians themselves are checked exactly in block 0).
            assert abs(d["err"] - d["err_single"]) <= 0.05 * d["err_single"], (path, d)
        elif d["kind"] in ("uniform", "mixed(uniform)"):  # GPTQ: the same codes
            assert d["mismatch"] <= 1e-3, (path, d)
        else:  # K-Means centroids move by float rounding; a few weights change code
            assert d["mismatch"] <= 0.02 and d["maxdiff"] <= 1e-3, (path, d)
    # Device memory does not grow with depth: earlier blocks left the devices.
    mem = cal["memory"]
    assert max(mem["2"]) <= max(mem["0"]) + cal["block_bytes"] // 32, mem


# ----------------------------------------------------------------------------------------
# Two processes on localhost.


def test_two_processes_equal_one_process():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
    procs = [_child("tests.multihost_child", {**env, "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    try:
        outs = [_result(p, timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    params, cfg, windows = multihost_case()
    single = evaluate_perplexity(params, cfg, windows, batch_size=4, progress=False)
    for i, out in enumerate(outs):
        assert out["how"] == "environment" and out["process_index"] == i
        assert out["process_count"] == out["processes"] == 2
        assert out["devices"] == 4 and out["local_devices"] == 2
        assert out["mesh"] == {"data": 2, "model": 2}
        assert math.isclose(out["ppl"], single.ppl, rel_tol=1e-5)
        np.testing.assert_allclose(out["window_nll"], single.window_nll, rtol=1e-5)
