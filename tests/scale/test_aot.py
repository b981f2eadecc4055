"""Deviceless TPU v3 compilation of the real train step and a sharded merge (tools/aot_check.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["models/tiny.gin", "runs/base.gin", "meshes/v3-8.gin"]
SMALL = ["DataConfig.seq_len=128", "DataConfig.global_batch_size=32", "train.grad_accum_steps=2"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("aot_check", ROOT / "tools" / "aot_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["aot_check"] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def aot():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip(
            'libtpu not installed: pip install "jax[tpu]==<jax version>" to run deviceless TPU compiles'
        )
    mod = _load_tool()
    ok, why = mod.libtpu_available()
    if not ok:
        pytest.skip(why)
    return mod


def test_tiny_train_step_compiles_for_v3_8(aot):
    r = aot.check_train(aot.Plan("tiny", "v3-8", TINY, SMALL))
    assert r["verdict"] == "fits", r
    assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert r["grad_accum"] == 2 and r["seqs_per_device_per_micro"] == 2
    mem = r["memory_bytes"]
    assert 0 < mem["peak"] < aot.V3_USABLE_HBM_BYTES
    # fp32 params + two Adam moments sharded 8 ways: the arguments hold ~3x params/8 (+ replicated scalars).
    n = r["params"]
    assert 3 * n * 4 / 8 <= mem["argument"] <= 3 * n * 4 / 8 * 1.5 + (1 << 20)
    assert r["model_flops_per_step"] == pytest.approx(_flops_per_token_tiny(aot) * 32 * 128)
    assert r["ideal_step_s"] == pytest.approx(r["model_flops_per_step"] / (8 * 61.5e12))


def _flops_per_token_tiny(aot):
    from ptm.model.llama import flops_per_token

    return flops_per_token(aot.resolve_plan(aot.Plan("tiny", "v3-8", TINY, SMALL)).model, 128)


def test_tiny_sharded_merge_compiles(aot):
    r = aot.check_merge(aot.Plan("tiny", "v3-8", TINY, SMALL))
    assert r["verdict"] == "fits" and r["inputs"] == 3
    assert r["memory_bytes"]["argument"] > 0


@pytest.mark.slow  # a fresh process loads jax + libtpu and compiles: ~20 s
def test_out_of_memory_is_a_verdict_via_cli(aot, tmp_path):
    # 32k tokens of attention scores per device (fp32 [4 heads, 32768, 32768] = 16 GiB) cannot fit 15.48 GiB.
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "tools" / "aot_check.py"), "--topology", "v3-8", "--json", str(out)]
    for f in TINY:
        cmd += ["--gin_file", f]
    for b in (
        "DataConfig.seq_len=32768",
        "DataConfig.global_batch_size=8",
        "ModelConfig.max_seq_len=32768",
        "train.grad_accum_steps=1",
    ):
        cmd += ["--gin", b]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    (r,) = json.loads(out.read_text())
    assert r["verdict"] in ("RESOURCE_EXHAUSTED", "over HBM"), r
    assert "RESOURCE_EXHAUSTED" in p.stdout or "over HBM" in p.stdout


def test_paper_plans_match_the_mesh_gin_files(aot):
    """The named 7B plans resolve from the gin files to a valid mesh and accumulation for their slice size."""
    for name, plan in aot.PLANS.items():
        r = aot.resolve_plan(plan)
        n = int(name.split("-")[1])
        data, fsdp, tensor = r.mesh.resolve(n)
        assert data * fsdp * tensor == n
        assert r.global_batch == 128 and r.seq_len == 4096 and r.model.num_layers == 32
        micro = r.global_batch // r.grad_accum
        assert micro * r.grad_accum == 128 and micro % (data * fsdp) == 0, name
