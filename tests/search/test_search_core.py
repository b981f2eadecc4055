"""The CMA-ES loop and the search space, on plain Python objectives (no model, no harness)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptm.errors import ConfigError
from ptm.search.cma import SearchLog, cma_search
from ptm.search.config import SearchConfig
from ptm.search.objective import check_tasks, parse_objective
from ptm.search.space import Space, abs_simplex
from ptm.search.study import pareto_front, sweep_weights


@pytest.mark.parametrize("param", ["softmax", "abs"])
def test_parametrisation_stays_on_simplex(param):
    rng = np.random.default_rng(0)
    for groups in (1, 3):
        sp = Space(n=5, parametrisation=param, layer_groups=0 if groups == 1 else groups - 1)
        for scale in (1e-3, 1.0, 30.0, 700.0):  # 700: exp would overflow without the max shift
            for _ in range(50):
                w = sp.weights(rng.standard_normal(sp.dim) * scale)
                assert w.shape == (groups, 5)
                assert np.all(np.isfinite(w)) and np.all(w >= 0)
                np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert np.allclose(sp.weights(sp.x0()), 1 / 5)  # the search starts at the uniform soup
    if param == "abs":
        assert np.allclose(abs_simplex(np.zeros(4)), 0.25)  # degenerate point maps to uniform


def _quadratic_problem(n=4, d=64, seed=0):
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((n, d))
    target_w = rng.dirichlet(np.ones(n) * 2)
    target = target_w @ pool

    def f(w):
        merged = w[0] @ pool
        return -float(np.linalg.norm(merged - target)), {"dist": float(np.linalg.norm(w[0] - target_w))}
    return f, target_w


def test_search_finds_known_optimum():
    f, target_w = _quadratic_problem()
    res = cma_search(f, Space(n=4), budget_evals=400, seed=1)
    np.testing.assert_allclose(np.asarray(res.best_weights[0]), target_w, atol=0.02)
    assert res.best_value > -0.05
    # the uniform soup (the starting point) is much worse: the search did the work
    assert f(np.full((1, 4), 0.25))[0] < res.best_value - 0.3


def test_task_vector_space_finds_unnormalised_optimum():
    rng = np.random.default_rng(3)
    pool = rng.standard_normal((3, 40))
    want = np.array([0.9, -0.2, 0.6])  # sums to 1.3: outside the simplex
    f = lambda w: -float(np.linalg.norm(w[0] @ pool - want @ pool))
    res = cma_search(f, Space(n=3, kind="task_vector", bounds=(-1.0, 2.0)), budget_evals=300, seed=0)
    np.testing.assert_allclose(res.best_weights[0], want, atol=0.03)


def _read(path):
    return [json.loads(x) for x in open(path)]


def test_resume_from_log_gives_same_trajectory(tmp_path):
    f, _ = _quadratic_problem(seed=5)
    calls = {"n": 0}

    def counted(w):
        calls["n"] += 1
        return f(w)

    sp = Space(n=4)
    log_a = SearchLog(str(tmp_path / "a.jsonl"), {"k": 1})
    full = cma_search(counted, sp, budget_evals=40, seed=7, log=log_a)
    # killed after 17 evaluations (mid-generation), with a torn last line
    part_log = str(tmp_path / "b.jsonl")
    cma_search(f, sp, budget_evals=17, seed=7, log=SearchLog(part_log, {"k": 1}))
    with open(part_log, "a") as fh:
        fh.write('{"type": "candidate", "run": "ma')
    calls["n"] = 0
    resumed = cma_search(counted, sp, budget_evals=40, seed=7, log=SearchLog(part_log, {"k": 1}))
    assert resumed.replayed == 17 and calls["n"] == 40 - 17
    a, b = _read(tmp_path / "a.jsonl"), _read(part_log)
    assert len(a) == len(b) == 41
    for ra, rb in zip(a[1:], b[1:], strict=True):
        assert (ra["x"], ra["value"], ra["gen"], ra["k"]) == (rb["x"], rb["value"], rb["gen"], rb["k"])
    assert full.best_weights == resumed.best_weights
    assert [h["value"] for h in full.history] == [h["value"] for h in resumed.history]


def test_resume_rejects_a_different_search(tmp_path):
    f, _ = _quadratic_problem()
    log = str(tmp_path / "l.jsonl")
    cma_search(f, Space(n=4), budget_evals=5, seed=0, log=SearchLog(log, {"seed": 0}))
    with pytest.raises(ConfigError, match="different search"):
        SearchLog(log, {"seed": 1})
    with pytest.raises(ConfigError, match="not what this search asks"):  # same header, different seed
        cma_search(f, Space(n=4), budget_evals=10, seed=1, log=SearchLog(log, {"seed": 0}))


def test_budget_and_objective_errors():
    f, _ = _quadratic_problem()
    with pytest.raises(ConfigError, match="budget"):
        cma_search(f, Space(n=4), budget_evals=0)
    with pytest.raises(ConfigError, match="budget"):
        cma_search(f, Space(n=4))
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        check_tasks([parse_objective("copy,nope:2")], {"copy": True}, "val/")
    with pytest.raises(ConfigError, match="positive"):
        parse_objective("copy:-1")
    with pytest.raises(ConfigError, match="budget_evals"):
        SearchConfig(pool=["a"], val="v", test="t", objectives=[parse_objective("x")],
                       budget_evals=0).validate()
    o = parse_objective("a:1,b:3")
    assert o({"a": 1.0, "b": 0.0}) == pytest.approx(0.25)


def test_seconds_budget_stops():
    f, _ = _quadratic_problem()
    res = cma_search(lambda w: (__import__("time").sleep(0.02), f(w))[1], Space(n=4), budget_seconds=0.2)
    assert 5 <= res.evaluations <= 15


def test_pareto_helpers():
    pts = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.4, 0.4], [1, 0]])
    assert sorted(pareto_front(pts).tolist()) == [0, 1, 2]
    w2 = sweep_weights(2, 3)
    assert w2 == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    w3 = sweep_weights(3, 3)
    assert len(w3) == 6 and all(abs(sum(w) - 1) < 1e-12 for w in w3)


def test_evaluator_registers_the_toy_checker(tmp_path):
    """A search on the toy suite scores its coding items with the toy_lisp checker, registered by the search
    itself (a fresh process: nothing else registered it)."""
    import subprocess
    import sys

    item = {"task": "coding", "messages": [{"role": "user", "content": "Write toy Lisp for: add 1 and 2"}],
            "reference": "3", "scorer": "program", "meta": {"checker": "toy_lisp"}}
    (tmp_path / "coding.jsonl").write_text(json.dumps(item) + "\n")
    code = f"""
from ptm.eval import scorers
from ptm.search.config import SearchConfig
from ptm.search.objective import parse_objective
from ptm.search.study import Evaluator
assert "toy_lisp" not in scorers.CHECKERS
ev = Evaluator({str(tmp_path)!r}, {{"coding"}}, None, None, None, SearchConfig(), [parse_objective("coding")])
assert [it.task for it in ev.items] == ["coding"] and "toy_lisp" in scorers.CHECKERS
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
