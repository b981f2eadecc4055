"""Bad input: clear PtmError naming the culprit, nothing written or overwritten. And the CLI."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from ptm import cli
from ptm.errors import CheckpointError, ConfigError, MergeError, PtmError
from ptm.merge import engine
from ptm.merge.recipe import Recipe, load
from tests.merge.conftest import BF16, random_tree, restore, save_orbax, save_safetensors


def ta(paths, out, **kw):
    return Recipe(
        "task_arithmetic",
        {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"]]},
        out=str(out),
        **kw,
    )


def test_mismatched_inputs_lists_every_problem(tmp_path, ckpts):
    paths, _ = ckpts
    t = random_tree(9, vocab=66)  # vocab 64 vs 66
    t["layers"]["mlp"]["w_up"] = t["layers"]["mlp"]["w_up"].astype(np.float32)  # dtype
    del t["final_norm"]  # missing
    t["extra"] = {"w": np.zeros(3, BF16)}  # extra
    bad = save_orbax(tmp_path / "bad", t)
    with pytest.raises(MergeError) as e:
        engine.merge(ta({**paths, "s1": bad}, tmp_path / "out"), progress=False)
    msg = str(e.value)
    for needle in (
        "missing tensor 'final_norm.scale'",
        "extra tensor 'extra.w'",
        "shape [66, 16]",
        "'layers.mlp.w_up' has dtype float32",
        "4 problem(s)",
    ):
        assert needle in msg, msg
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.ptm-merge-tmp").exists()


def test_nonfinite_refused_unless_allowed(tmp_path, ckpts):
    paths, _ = ckpts
    t = random_tree(1)
    t["layers"]["mlp"]["w_up"][1, 2, 3] = np.inf
    bad = save_orbax(tmp_path / "nan", t)
    with pytest.raises(MergeError, match=r"nan.*layers.mlp.w_up.*NaN/Inf"):
        engine.merge(ta({**paths, "general": bad}, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.ptm-merge-tmp").exists()
    engine.merge(ta({**paths, "general": bad}, tmp_path / "out", allow_nonfinite=True), progress=False)
    assert np.isinf(restore(str(tmp_path / "out"))["layers.mlp.w_up"].astype(np.float32)).sum() == 1


@pytest.mark.parametrize(
    "recipe_kw,match",
    [
        ({"method": "nope"}, "unknown merge method 'nope'"),
        ({"weights": [0.1, 0.2]}, "2 weights given but method 'task_arithmetic' needs 1"),
        ({"method": "ties", "density": 0.0}, r"density must be in \(0, 1\]"),
        ({"method": "ties", "density": 1.5}, r"density must be in \(0, 1\]"),
        ({"method": "dare", "drop_rate": -0.1}, r"drop_rate must be in \(0, 1\]"),
        ({"weights": {"layers": [0.1]}}, "layer schedule has 1 values but the model has 3 layers"),
        ({"weights": "heuristic", "inputs": "nometa"}, "needs data.train_examples"),
    ],
)
def test_bad_recipes(tmp_path, ckpts, recipe_kw, match):
    paths, _ = ckpts
    kw = dict(recipe_kw)
    r = ta(paths, tmp_path / "out")
    if kw.pop("inputs", None):
        r.inputs["general"] = save_orbax(tmp_path / "nometa", random_tree(1))
    for k, v in kw.items():
        setattr(r, k, v)
    with pytest.raises(MergeError, match=match):
        engine.merge(r, progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_untouched(tmp_path, ckpts):
    paths, _ = ckpts
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(MergeError, match="output exists"):
        engine.merge(ta(paths, out), progress=False)
    assert (out / "keep").read_text() == "mine"
    engine.merge(ta(paths, out), overwrite=True, progress=False)
    assert not (out / "keep").exists() and restore(str(out))


def test_corrupt_orbax_checkpoint(tmp_path, ckpts):
    paths, _ = ckpts
    bad = save_orbax(tmp_path / "trunc", random_tree(2))
    # truncate the OCDBT data files: the tensors can no longer be read
    for root, _, files in os.walk(f"{bad}/params"):
        for f in files:
            if "/d" in root.replace(bad, ""):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(10)
    with pytest.raises(CheckpointError, match="trunc"):
        engine.merge(ta({**paths, "s1": bad}, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.ptm-merge-tmp").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        engine.merge(ta({**paths, "s1": str(tmp_path / "empty")}, tmp_path / "out"), progress=False)


def test_safetensors_lying_header(tmp_path):
    p = save_safetensors(tmp_path / "st", {"a": np.ones((4, 4), np.float32)})
    f = f"{p}/model.safetensors"
    raw = open(f, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(raw[8 : 8 + n])
    h["a"]["shape"] = [8, 4]  # claims 128 bytes, holds 64
    hb = json.dumps(h).encode()
    open(f, "wb").write(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    with pytest.raises(CheckpointError, match=r"tensor 'a' claims bytes \[0, 64\)"):
        engine.merge(Recipe("linear", {"models": [p]}, out=str(tmp_path / "o")), progress=False)
    h["a"]["shape"], h["a"]["data_offsets"] = [8, 4], [0, 128]  # consistent but past the end of the file
    hb = json.dumps(h).encode()
    open(f, "wb").write(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    with pytest.raises(CheckpointError, match="truncated file or lying header"):
        engine.merge(Recipe("linear", {"models": [p]}, out=str(tmp_path / "o")), progress=False)


def test_example_recipes_parse():
    import glob

    files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "../../configs/merges/*.toml")))
    assert len(files) >= 4
    for f in files:
        assert load(f)
    assert len(load([f for f in files if "sweep" in f][0])) == 5


def test_recipe_errors(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('method = "linear"\nbogus = 1\n[inputs]\nmodels = ["a"]\n')
    with pytest.raises(ConfigError, match="bogus"):
        load(str(f))


def test_cli_merge_inspect_diff(tmp_path, ckpts, capsys):
    paths, _ = ckpts
    out = tmp_path / "cli-out"
    rc = cli.main(
        [
            "merge",
            "--method",
            "task_arithmetic",
            "--pre",
            paths["pre"],
            "--general",
            paths["general"],
            "--skill",
            paths["s1"],
            "--omega",
            "0.3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "merged 1 output(s)" in capsys.readouterr().err
    ref = tmp_path / "lib-out"
    engine.merge(ta(paths, ref, weights=0.3), progress=False)
    a, b = restore(str(out)), restore(str(ref))
    assert all(np.array_equal(a[n].view(np.uint16), b[n].view(np.uint16)) for n in a)
    # recipe file with a sweep
    toml = tmp_path / "sweep.toml"
    toml.write_text(
        f'method = "task_arithmetic"\nout = "{tmp_path}/sw-{{omega}}"\nsweep = [0.3, 0.6]\n'
        f'[inputs]\npre = "{paths["pre"]}"\ngeneral = "{paths["general"]}"\nskills = ["{paths["s1"]}"]\n'
    )
    assert cli.main(["merge", str(toml), "--no-progress"]) == 0
    a = restore(f"{tmp_path}/sw-0.3")
    assert all(np.array_equal(a[n].view(np.uint16), b[n].view(np.uint16)) for n in a)
    # errors exit 2 and name the problem
    assert cli.main(["merge", str(toml), "--no-progress"]) == 2
    assert "output exists" in capsys.readouterr().err
    assert cli.main(["inspect", paths["pre"]]) == 0
    o = capsys.readouterr().out
    assert "layers.attention.wq" in o and "[3, 16, 2, 8]" in o and "bfloat16" in o
    assert cli.main(["diff", paths["s1"], paths["s1"], "--base", paths["pre"]]) == 0
    o = capsys.readouterr().out
    assert "layer   2: cos 1.0000" in o


def test_layer_cosines(ckpts):
    from ptm.merge.inspect import diff, layer_cosines

    paths, t = ckpts
    cos = layer_cosines(paths["s1"], paths["s2"], paths["pre"])
    assert len(cos) == 3
    tau1 = [
        t["s1"][n].astype(np.float64) - t["pre"][n].astype(np.float64)
        for n in t["pre"]
        if n.startswith("layers.")
    ]
    tau2 = [
        t["s2"][n].astype(np.float64) - t["pre"][n].astype(np.float64)
        for n in t["pre"]
        if n.startswith("layers.")
    ]
    a = np.concatenate([x[1].ravel() for x in tau1])
    b = np.concatenate([x[1].ravel() for x in tau2])
    assert cos[1] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-9)
    assert isinstance(diff(paths["s1"], paths["s2"]).total_cos, float)
    with pytest.raises(PtmError):
        diff(paths["s1"], "/nonexistent")


def test_single_process_merge_does_not_import_jax(tmp_path):
    """`ptm merge` on one host never imports jax (0.6-1 s of a 1B merge's start-up); PTM_* variables, as on a
    cluster, take the distributed path, which with one process merges the same bits."""
    import subprocess
    import sys

    paths = {}
    for i, n in enumerate(("pre", "general", "s1")):
        rng = np.random.default_rng(i)
        t = {f"model.layers.{k}.mlp.up_proj.weight": rng.standard_normal((8, 4)).astype(BF16) for k in range(2)}
        paths[n] = save_safetensors(tmp_path / n, {**t, "model.embed_tokens.weight": np.ones((10, 4), BF16)})
    prog = ("import sys; from ptm import cli; rc = cli.main(sys.argv[1:]); "
            "print('jax' in sys.modules); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTM_")}
    outs = {}
    for case, extra in (("plain", {"PTM_TPU_VM": "0"}), ("cluster-env", {"PTM_TPU_VM": "0", "PTM_NUM_PROCESSES": "1"})):
        out = tmp_path / f"out-{case}"
        r = subprocess.run([sys.executable, "-c", prog, "merge", "--method", "task_arithmetic", "--pre", paths["pre"],
                            "--general", paths["general"], "--skill", paths["s1"], "--omega", "0.3", "--out",
                            str(out), "--no-progress"], env={**env, **extra}, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        assert r.returncode == 0, r.stderr
        outs[case] = (r.stdout.strip().splitlines()[-1], (out / "model.safetensors").read_bytes())
    assert outs["plain"][0] == "False" and outs["cluster-env"][0] == "True"
    assert outs["plain"][1] == outs["cluster-env"][1] and len(outs["plain"][1]) > 100
