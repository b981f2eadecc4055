"""The toy checker is registered explicitly: importing ptm.eval (or ptm.toy) registers nothing, `register()` is
idempotent, and `ptm eval` registers the built-in checkers itself and names an item with an unknown one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ptm.eval import scorers
from ptm.toy import checkers

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def test_importing_eval_or_toy_registers_no_checker():
    code = """
import sys
import ptm.eval.commands, ptm.eval.evalset, ptm.eval.harness, ptm.eval.scorers as scorers
assert not any(m.startswith("ptm.toy") for m in sys.modules), sorted(m for m in sys.modules if "toy" in m)
import ptm.toy.checkers, ptm.toy.suite, ptm.toy.world
assert "toy_lisp" not in scorers.CHECKERS, sorted(scorers.CHECKERS)
try:
    scorers.get_checker("toy_lisp")
except KeyError as e:
    print(e.args[0])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "unknown checker 'toy_lisp'; known checkers: arith_expr, json_equal" in r.stdout


def test_register_is_idempotent():
    checkers.register()
    before = dict(scorers.CHECKERS)
    checkers.register()
    assert scorers.CHECKERS == before
    assert scorers.get_checker(checkers.CHECKER) is checkers.check_program


def _program_item(path, checker: str) -> str:
    item = {"task": "coding", "messages": [{"role": "user", "content": "Write toy Lisp for: add 1 and 2"}],
            "reference": "3", "scorer": "program", "meta": {"checker": checker}, "id": "coding/0"}
    path.write_text(json.dumps(item) + "\n")
    return str(path)


def test_ptm_eval_registers_the_toy_checker_and_names_an_unknown_one(tmp_path):
    base = [sys.executable, "-m", "ptm.cli", "eval", str(tmp_path / "no_ckpt"), "--suite"]
    good = _program_item(tmp_path / "good.jsonl", checkers.CHECKER)
    r = subprocess.run(base + [good], capture_output=True, text=True, env=ENV, timeout=120)
    # the suite loads (its checker is known), so the error is about the missing checkpoint
    assert r.returncode == 2 and "no_ckpt" in r.stderr and "unknown checker" not in r.stderr, r.stderr
    bad = _program_item(tmp_path / "bad.jsonl", "lisp_typo")
    r = subprocess.run(base + [bad], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{bad}:1: unknown checker 'lisp_typo'" in r.stderr
    assert "known checkers: arith_expr, json_equal, toy_lisp" in r.stderr


def test_ptm_toy_writes_the_same_suite_as_python_m(tmp_path):
    sizes = ["--size=pretrain=30", "--size=general=20", "--size=science=6", "--size=safety=6", "--size=coding=6",
             "--size=eval=2"]
    a = subprocess.run([sys.executable, "-m", "ptm.cli", "toy", str(tmp_path / "a"), *sizes], capture_output=True,
                       text=True, env=ENV, timeout=120)
    b = subprocess.run([sys.executable, "-m", "ptm.toy", str(tmp_path / "b"), *sizes], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    r = subprocess.run([sys.executable, "-m", "ptm.cli", "toy", str(tmp_path / "c"), "--size", "eval"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and "ptm toy: error: --size 'eval': expected NAME=N" in r.stderr
