"""Issue 12, items 7 and 8: non-finite weights and outputs, and unparseable weight flags — refused with a message
naming the recipe/flag and the value, nothing written, exit 2 without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ptm import cli
from ptm.errors import MergeError
from ptm.merge import engine
from ptm.merge.recipe import Recipe, load
from tests.merge.conftest import f32, restore


def _flags(paths, out, *extra):
    return ["merge", "--method", "task_arithmetic", "--pre", paths["pre"], "--general", paths["general"],
            "--skill", paths["s1"], "--skill", paths["s2"], "--out", str(out), "--no-progress", *extra]


# ------------------------------------------------------------------------------ item 7: non-finite weights


@pytest.mark.parametrize(
    "flag,value,want",
    [
        ("--omega", "nan", "command line: omega: weight = nan is not finite"),
        ("--omega", "inf", "command line: omega: weight = inf is not finite"),
        ("--omega", "1e40", "command line: omega: weight = 1e+40 overflows float32"),
        ("--omega", "0.1,nan", r"command line: omega: weight [1] = nan is not finite"),
        ("--sweep", "0.1,1e40", r"command line: sweep[1]: weight = 1e+40 overflows float32"),
    ],
)
def test_cli_nonfinite_weight_refused(tmp_path, ckpts, capsys, flag, value, want):
    paths, _ = ckpts
    out = tmp_path / ("o-{omega}" if flag == "--sweep" else "o")
    assert cli.main(_flags(paths, out, flag, value)) == 2
    err = capsys.readouterr().err
    assert want in err, err
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def _toml(tmp_path, paths, body: str) -> str:
    f = tmp_path / "r.toml"
    f.write_text(
        f'method = "task_arithmetic"\nout = "{tmp_path}/out-{{i}}"\n{body}\n'
        f'[inputs]\npre = "{paths["pre"]}"\ngeneral = "{paths["general"]}"\nskills = ["{paths["s1"]}"]\n'
    )
    return str(f)


@pytest.mark.parametrize(
    "body,want",
    [
        ("omega = nan", "omega: weight = nan is not finite"),
        ("omega = -inf", "omega: weight = -inf is not finite"),
        ("omega = 1e40", "omega: weight = 1e+40 overflows float32"),
        ("omega = {layers = [0.1, nan, 0.2]}", "omega: weight .layers[1] = nan is not finite"),
        ("omega = {anchors = [0.1, inf]}", "omega: weight .anchors[1] = inf is not finite"),
        ("omega = {anchors = [0.1, 0.2], default = nan}", "omega: weight .default = nan is not finite"),
        ("weights = [nan]", "weights: weight [0] = nan is not finite"),
        ("omega = 0.3\n[[overrides]]\npattern = 'embed.*'\nomega = nan",
         "overrides[0] (pattern 'embed.*'): weight = nan is not finite"),
        ("sweep = [0.1, nan]", "sweep[1]: weight = nan is not finite"),
    ],
)
def test_recipe_nonfinite_weight_refused(tmp_path, ckpts, body, want):
    paths, _ = ckpts
    f = _toml(tmp_path, paths, body)
    with pytest.raises(MergeError) as e:
        engine.merge(load(f), progress=False)
    assert f"{f}: {want}" in str(e.value)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("weights", [float("nan"), [float("inf")], {"layers": [0.1, 1e39, 0.2]}])
def test_code_built_recipe_nonfinite_weight_refused(tmp_path, ckpts, weights):
    """Recipes built in code (experiment, search) are checked where weights are resolved, for every tensor."""
    paths, _ = ckpts
    r = Recipe("task_arithmetic", {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"]]},
               weights=weights, out=str(tmp_path / "o"), name="cand7")
    with pytest.raises(MergeError, match=rf"recipe cand7 \(out {tmp_path}/o\): weight.* (is not finite|overflows)"):
        engine.merge(r, progress=False)
    with pytest.raises(MergeError, match="recipe cand7"):
        engine.merge_to_tree(r)
    assert not (tmp_path / "o").exists()
    r.overrides = [{"pattern": "final_norm.*", "weights": float("nan")}]
    r.weights = 0.3
    with pytest.raises(MergeError, match=r"recipe cand7 \(out .*\): override 'final_norm.\*': weight = nan"):
        engine.merge(r, progress=False)


# ------------------------------------------------------------------- item 7: outputs that became non-finite


def test_output_overflow_refused_unless_allowed(tmp_path, ckpts):
    """A weight finite in float32 (3e38) times a task vector overflows: the output piece is checked too."""
    paths, _ = ckpts
    r = Recipe("task_arithmetic", {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"]]},
               weights=3e38, out=str(tmp_path / "o"))
    with pytest.raises(MergeError, match=rf"{tmp_path}/o \(recipe task_arithmetic, weights 3e\+38, output dtype "
                                         r"bfloat16\): merged tensor 'embed.embedding' became NaN/Inf"):
        engine.merge(r, progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.ptm-merge-tmp").exists()
    with pytest.raises(MergeError, match="in-memory merge .*'embed.embedding' became NaN/Inf"):
        engine.merge_to_tree(Recipe(**{**r.__dict__, "out": None}))
    r.allow_nonfinite = True  # asked for: written as computed
    engine.merge(r, progress=False, summary=False)
    assert not np.isfinite(f32(restore(str(tmp_path / "o"))["embed.embedding"])).all()


def test_output_dtype_overflow_refused(tmp_path, ckpts):
    """float16 holds at most 65504: a merge fine in float32 overflows in a float16 output (one recipe of a sweep
    with two: the message names that one)."""
    paths, t = ckpts
    base = Recipe("task_arithmetic", {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"]]},
                  out=str(tmp_path / "o-{i}"), output_dtype="float16")
    from ptm.merge.recipe import expand_sweep

    rs = expand_sweep(base, [0.5, 1e5])
    with pytest.raises(MergeError, match=rf"{tmp_path}/o-1 \(recipe sweep\[1\], weights 100000.0, output dtype "
                                         r"float16\): merged tensor '.*' became NaN/Inf"):
        engine.merge(rs, progress=False)
    assert not (tmp_path / "o-0").exists() and not (tmp_path / "o-1").exists()
    engine.merge(rs[:1], progress=False, summary=False)  # the finite one alone is fine
    assert np.isfinite(f32(restore(str(tmp_path / "o-0"))["layers.mlp.w_up"])).all()


# ---------------------------------------------------------------------- item 8: weight flags that are not numbers


@pytest.mark.parametrize(
    "flag,value,want",
    [
        ("--omega", "abc", "--omega 'abc': 'abc' is not a number"),
        ("--omega", "0.1,abc", "--omega '0.1,abc': 'abc' is not a number"),
        ("--omega", "0.1,", "--omega '0.1,': '' is not a number"),
        ("--sweep", "0.1,abc", "--sweep '0.1,abc': 'abc' is not a number"),
    ],
)
def test_cli_weight_flag_not_a_number(tmp_path, ckpts, capsys, flag, value, want):
    paths, _ = ckpts
    out = tmp_path / ("o-{omega}" if flag == "--sweep" else "o")
    assert cli.main(_flags(paths, out, flag, value)) == 2
    err = capsys.readouterr().err
    assert want in err and err.startswith("ptm merge: error:"), err
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_cli_weight_flag_not_a_number_no_traceback(tmp_path, ckpts):
    paths, _ = ckpts
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-m", "ptm.cli", *_flags(paths, tmp_path / "o", "--omega", "0.1,abc")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "--omega '0.1,abc': 'abc' is not a number" in p.stderr
    assert "Traceback" not in p.stderr and "ValueError" not in p.stderr
