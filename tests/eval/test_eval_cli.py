"""`ptm eval` end to end: a real Orbax checkpoint in the ptm layout, the CLI in a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ptm.ckpt import format as ckpt_format
from ptm.ckpt.params import load_checkpoint
from ptm.cli import main
from ptm.eval.harness import evaluate
from ptm.model.config import ModelConfig
from ptm.model.llama import init_params


def save_checkpoint(path, cfg: ModelConfig, params) -> None:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "params", params)
    ckptr.wait_until_finished()
    ckpt_format.write_meta(path, ckpt_format.make_meta(cfg.to_dict(), step=10))


def run_cli(*args, check=True):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    p = subprocess.run(
        [sys.executable, "-m", "ptm.cli", "eval", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_config, tiny_params):
    d = tmp_path_factory.mktemp("ckpt") / "step_10"
    save_checkpoint(d, tiny_config, tiny_params)
    return d


def test_cli_end_to_end_matches_library(ckpt, suite_dir, tmp_path, tok):
    out = tmp_path / "res" / "eval.json"
    p = run_cli(
        ckpt,
        "--suite",
        suite_dir,
        "--out",
        out,
        "--batch-size",
        4,
        "--max-new-tokens",
        40,
        "--items",
        "--no-progress",
    )
    for task in ("mmlu_toy", "gsm_toy", "capital", "xstest_toy", "arith_code", "heldout_ppl"):
        assert task in p.stdout
    assert "avg general" in p.stdout and "examples/s" in p.stdout
    data = json.loads(out.read_text())
    (res,) = data["results"]
    assert res["model"] == str(ckpt) and res["counts"]["items"] == 48 and len(res["items"]) == 48

    # Same numbers as the library on the restored params.
    params, cfg, meta = load_checkpoint(str(ckpt))
    assert meta["step"] == 10
    lib = evaluate(params, cfg, tok, suite_dir, batch_size=4, max_new_tokens=40)
    for name, t in lib.tasks.items():
        assert math.isclose(res["tasks"][name]["score"], t.score, rel_tol=1e-4), name
    assert res["categories"].keys() == lib.categories.keys()

    # Never overwrites results silently.
    again = run_cli(ckpt, "--suite", suite_dir, "--out", out, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_relative_checkpoint_path_loads(ckpt, tiny_params, monkeypatch):
    """`ptm eval results/run` from the shell: Orbax wants absolute paths, ptm resolves relative ones."""
    monkeypatch.chdir(ckpt.parent.parent)
    params, _, meta = load_checkpoint(f"{ckpt.parent.name}/{ckpt.name}")
    assert meta["step"] == 10
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tiny_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_user_errors(ckpt, tmp_path, capsys):
    """Bad input exits 2 with a message naming the culprit (in-process: same parser and handler)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"task": "t", "messages": [{"role": "user", "content": "q"}], "reference": "a", "scorer": "bleu"}\n'
    )
    assert main(["eval", str(ckpt), "--suite", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "known scorers" in err

    big = tmp_path / "big_vocab"
    cfg = ModelConfig(
        vocab_size=1000, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64
    )
    save_checkpoint(big, cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1)))
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"task": "t", "messages": [{"role": "user", "content": "q"}], "reference": "a", '
        '"scorer": "exact_match"}\n'
    )
    assert main(["eval", str(big), "--suite", str(good)]) == 2
    err = capsys.readouterr().err
    assert "vocab_size=1000 does not match tokenizer 'byte'" in err and str(big) in err

    assert main(["eval", str(tmp_path / "missing"), "--suite", str(good)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["eval", "--suite", str(good)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_cli_recipe_evaluates_in_memory_merge(ckpt, tiny_config, tiny_params, suite_dir, tmp_path, tok):
    """--recipe merges through the engine without writing, and scores what a hand-made merge scores."""
    skill = tmp_path / "skill"
    skill_params = jax.tree.map(lambda x: x * 0.5, tiny_params)
    save_checkpoint(skill, tiny_config, skill_params)
    toml = tmp_path / "ptm.toml"
    toml.write_text(
        f'method = "task_arithmetic"\nomega = 0.5\nout = "{tmp_path / "never"}"\n\n'
        f'[inputs]\npre = "{ckpt}"\ngeneral = "{ckpt}"\nskills = ["{skill}"]\n'
    )
    out = tmp_path / "recipe.json"
    assert (
        main(
            [
                "eval",
                "--recipe",
                str(toml),
                "--suite",
                str(suite_dir),
                "--out",
                str(out),
                "--batch-size",
                "4",
                "--max-new-tokens",
                "40",
                "--no-progress",
            ]
        )
        == 0
    )
    assert not (tmp_path / "never").exists()
    (res,) = json.loads(out.read_text())["results"]
    assert res["kind"] == "recipe"
    merged = jax.tree.map(lambda g, s: g + 0.5 * (s - g), tiny_params, skill_params)
    lib = evaluate(merged, tiny_config, tok, suite_dir, batch_size=4, max_new_tokens=40)
    for name, t in lib.tasks.items():
        assert math.isclose(res["tasks"][name]["score"], t.score, rel_tol=1e-4), name
