"""Sweeps, sharding, stores (safetensors, gs://), atomicity and the kill test."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ptm.ckpt import format as ckpt_format
from ptm.ckpt import stores as S
from ptm.ckpt.tree import flatten
from ptm.errors import CheckpointError
from ptm.merge import engine
from ptm.merge.recipe import Recipe, expand_sweep
from tests.merge.conftest import BF16, random_tree, restore, save_orbax, save_safetensors


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[n].view(np.uint8), b[n].view(np.uint8)) for n in a)


def test_sweep_equals_single_merges(tmp_path, ckpts):
    paths, _ = ckpts
    base = Recipe(
        "task_arithmetic",
        {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"]]},
        out=str(tmp_path / "sweep-{omega}"),
    )
    omegas = [0.1, 0.3, 1.0]
    s = engine.merge(expand_sweep(base, omegas), progress=False, summary=False)
    assert s.bytes_read == sum(a.nbytes for a in flatten(random_tree(0)).values()) * 3  # each input read once
    for w in omegas:
        single = Recipe("task_arithmetic", dict(base.inputs), weights=w, out=str(tmp_path / f"one-{w}"))
        engine.merge(single, progress=False, summary=False)
        assert same(restore(str(tmp_path / f"sweep-{w}")), restore(single.out))


@pytest.mark.parametrize(
    "method,kw",
    [
        ("ties", {"density": 0.4, "weights": [0.7, 1.0]}),
        ("dare", {"drop_rate": 0.3, "weights": [0.5, 0.5], "seed": 3}),
        ("task_arithmetic", {"weights": {"layers": [0.1, 0.2, 0.3]}}),
    ],
)
def test_sharded_equals_unsharded(tmp_path, ckpts, method, kw):
    import jax
    from jax.sharding import Mesh

    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    paths, _ = ckpts
    r = Recipe(
        method,
        {
            "pre": paths["pre"],
            "skills": [paths["s1"], paths["s2"]][
                : len(kw["weights"]) if isinstance(kw["weights"], list) else 1
            ],
        },
        out=str(tmp_path / "plain"),
        **kw,
    )
    engine.merge(r, progress=False, summary=False)
    r.out = str(tmp_path / "sharded")
    engine.merge(r, mesh=mesh, progress=False, summary=False)
    plain, sharded = restore(str(tmp_path / "plain")), restore(str(tmp_path / "sharded"))
    assert same(plain, sharded)
    # the output really is chunked per shard: embed [64, 16] is split 8 ways along the vocab axis
    assert (
        len([f for f in os.listdir(tmp_path / "sharded/params/embed.embedding") if not f.startswith(".")])
        == 8
    )
    tree = flatten(engine.merge_to_tree(r, mesh=mesh))
    for n, a in tree.items():
        assert isinstance(a, jax.Array) and len(a.sharding.device_set) == 8
        assert np.array_equal(np.asarray(a).view(np.uint16), plain[n].view(np.uint16)), n


def test_safetensors_in_and_out(tmp_path):
    hf = {}
    for i, n in enumerate(["pre", "g", "s"]):
        rng = np.random.default_rng(i)
        t = {
            f"model.layers.{k}.mlp.up_proj.weight": rng.standard_normal((8, 4)).astype(BF16) for k in range(2)
        }
        t["model.embed_tokens.weight"] = rng.standard_normal((10, 4)).astype(BF16)
        hf[n] = t
        save_safetensors(tmp_path / n, t)
    r = Recipe(
        "task_arithmetic",
        {"pre": str(tmp_path / "pre"), "general": str(tmp_path / "g"), "skills": [str(tmp_path / "s")]},
        weights={"layers": [0.0, 1.0], "default": 0.5},
        out=str(tmp_path / "out"),
    )
    engine.merge(r, progress=False, summary=False)
    from safetensors.flax import load_file

    got = load_file(str(tmp_path / "out/model.safetensors"))
    for n in hf["pre"]:
        w = 0.5 if "embed" in n else float(n.split(".")[2])
        ref = (
            hf["g"][n].astype(np.float32)
            + np.float32(w) * (hf["s"][n].astype(np.float32) - hf["pre"][n].astype(np.float32))
        ).astype(BF16)
        assert np.array_equal(np.asarray(got[n]).view(np.uint16), ref.view(np.uint16)), n
    # and Orbax output from safetensors input
    r.out, r.output_format = str(tmp_path / "orbax-out"), "orbax"
    engine.merge(r, progress=False, summary=False)
    assert ckpt_format.resolve(r.out).params_path.exists()
    ob = restore(r.out)
    assert all(np.array_equal(np.asarray(got[n]).view(np.uint16), ob[n].view(np.uint16)) for n in got)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sigkill_midway_then_rerun(tmp_path):
    """A real `python -m ptm.cli merge` killed with SIGKILL leaves nothing that looks complete; the rerun's
    bytes
    equal an uninterrupted merge's."""
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.w" for i in range(24)]
    for n in ("pre", "g", "s"):
        save_safetensors(
            tmp_path / n, {k: rng.standard_normal((1024, 1024)).astype(np.float32) for k in names}
        )

    def cmd(out):
        return [
            sys.executable,
            "-m",
            "ptm.cli",
            "merge",
            "--method",
            "task_arithmetic",
            "--pre",
            str(tmp_path / "pre"),
            "--general",
            str(tmp_path / "g"),
            "--skill",
            str(tmp_path / "s"),
            "--omega",
            "0.3",
            "--output-format",
            "orbax",
            "--out",
            str(out),
            "--no-progress",
        ]

    out = tmp_path / "out"
    tmp = tmp_path / ".out.ptm-merge-tmp"
    proc = subprocess.Popen(cmd(out), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if tmp.exists() and any(p.name == "0.0" for p in tmp.rglob("0.0")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "merge finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    with pytest.raises(CheckpointError):
        ckpt_format.resolve(out)
    assert subprocess.run(cmd(out), capture_output=True).returncode == 0
    assert not tmp.exists()
    after_kill = _digest(out)
    assert subprocess.run(cmd(out), capture_output=True).returncode == 2  # exists: refused, untouched
    assert _digest(out) == after_kill
    import shutil

    shutil.rmtree(out)
    assert subprocess.run(cmd(out), capture_output=True).returncode == 0  # an uninterrupted merge
    assert _digest(out) == after_kill
    assert restore(str(out)).keys() == set(names)


@pytest.mark.gcs
def test_gcs_in_and_out(tmp_path, gcs_bucket, ckpts):
    import gcsfs

    paths, t = ckpts
    fs = gcsfs.GCSFileSystem()
    remote = {}
    for n in ("pre", "general", "s1"):
        save_orbax(f"{gcs_bucket}/in/{n}", random_tree(["pre", "general", "s1"].index(n)))
        remote[n] = f"{gcs_bucket}/in/{n}"
    save_safetensors(tmp_path / "st", {"a.w": np.ones((4, 4), BF16)})
    fs.put(str(tmp_path / "st/model.safetensors"), f"{gcs_bucket}/st/model.safetensors")
    # fetched bytes on gs://, mapped pages locally (only these get their statistics computed ahead)
    assert S.SafetensorsStore(str(tmp_path / "st")).reads_are_views("a.w")
    assert not S.SafetensorsStore(f"{gcs_bucket}/st").reads_are_views("a.w")
    r = Recipe(
        "task_arithmetic",
        {"pre": remote["pre"], "general": remote["general"], "skills": [remote["s1"]]},
        weights=0.3,
        out=f"{gcs_bucket}/out",
    )
    engine.merge(r, progress=False, summary=False)
    local = Recipe(
        "task_arithmetic",
        {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"]]},
        weights=0.3,
        out=str(tmp_path / "local"),
    )
    engine.merge(local, progress=False, summary=False)
    assert same(restore(r.out), restore(local.out))
    with pytest.raises(Exception, match="exists"):
        engine.merge(r, progress=False, summary=False)
    # safetensors on gs:// in and out
    s = Recipe(
        "linear",
        {"models": [f"{gcs_bucket}/st", f"{gcs_bucket}/st"]},
        weights=[0.5, 0.25],
        out=f"{gcs_bucket}/st-out",
    )
    engine.merge(s, progress=False, summary=False)
    fs.get(f"{gcs_bucket}/st-out/model.safetensors", str(tmp_path / "st-out.safetensors"))
    from safetensors.flax import load_file

    np.testing.assert_array_equal(
        np.asarray(load_file(str(tmp_path / "st-out.safetensors"))["a.w"], np.float32),
        np.full((4, 4), 0.75, np.float32),
    )


def test_merge_threads_from_the_environment(monkeypatch):
    from ptm.errors import MergeError
    from ptm.merge import methods as M

    monkeypatch.setenv("PTM_MERGE_THREADS", "3")
    assert M.merge_threads() == 3
    monkeypatch.delenv("PTM_MERGE_THREADS")
    assert 1 <= M.merge_threads() <= 4 and M.merge_threads(1) == 1
    for bad in ("0", "two"):
        monkeypatch.setenv("PTM_MERGE_THREADS", bad)
        with pytest.raises(MergeError, match="PTM_MERGE_THREADS"):
            M.merge_threads()
