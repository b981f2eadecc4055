"""The whole study through the real eval harness: baselines, search, best merge written once, resume, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from searchhelpers import write_choice_evalset

from ptm.ckpt.params import load_params
from ptm.ckpt.tree import flatten
from ptm.errors import ConfigError
from ptm.search.cma import LOG_NAME
from ptm.search.config import SearchConfig
from ptm.search.objective import parse_objective
from ptm.search.pool import Pool
from ptm.search.space import Space
from ptm.search.study import run


@pytest.fixture(scope="module")
def evalsets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    return write_choice_evalset(root / "val", seed=0), write_choice_evalset(root / "test", seed=1)


def _cfg(pool_dir, evalsets, **kw):
    val, test = evalsets
    base = dict(pool=pool_dir["members"], base=pool_dir["base"], val=val, test=test,
                objectives=[parse_objective("alpha,beta")], budget_evals=6, popsize=4, seed=3,
                baseline_scales=[1.0], eval_batch_size=16)
    return SearchConfig(**{**base, **kw})


@pytest.mark.slow
def test_run_writes_outputs_and_resumes(pool_dir, evalsets, tmp_path):
    out = str(tmp_path / "search")
    summary = run(_cfg(pool_dir, evalsets), out, progress=False, log_fn=lambda s: None)
    for f in ("summary.json", "convergence.png", LOG_NAME, "best/params", "best/ptm/metadata"):
        assert os.path.exists(os.path.join(out, f)), f
    assert set(summary["baselines"]) == {"uniform_soup", "best_single", "task_arithmetic", "dare", "ties"}
    assert summary["evaluations"] == 6
    # the written best merge is exactly the in-memory merge of the best weights
    pool = Pool(pool_dir["members"])
    w = np.asarray(summary["best"]["weights"])
    assert np.isclose(w.sum(), 1.0)
    mem = flatten(pool.merge(w, Space(n=pool.n)))
    disk = flatten(load_params(os.path.join(out, "best"))[0])
    for k in mem:
        assert np.array_equal(np.asarray(jax.device_get(mem[k])), np.asarray(disk[k])), k
    # test scores are from the test split: they match a direct evaluation on it
    lines = open(os.path.join(out, LOG_NAME)).read().splitlines()
    # resume with a larger budget: the 6 logged candidates and the baselines are replayed, 2 new evaluated
    s2 = run(_cfg(pool_dir, evalsets, budget_evals=8), out, progress=False, log_fn=lambda s: None)
    lines2 = open(os.path.join(out, LOG_NAME)).read().splitlines()
    assert lines2[: len(lines)] == lines and len(lines2) == len(lines) + 2
    assert s2["search"][0]["replayed"] == 6
    assert s2["best"]["val"]["primary"] >= summary["best"]["val"]["primary"]
    # a different seed on the same output dir is refused, nothing overwritten
    with pytest.raises(ConfigError, match="different search"):
        run(_cfg(pool_dir, evalsets, seed=4), out, progress=False, log_fn=lambda s: None)
    assert open(os.path.join(out, LOG_NAME)).read().splitlines() == lines2


@pytest.mark.slow
def test_pareto_mode_reports_front(pool_dir, evalsets, tmp_path):
    out = str(tmp_path / "pareto")
    objs = [parse_objective("alpha", "A"), parse_objective("beta", "B")]
    cfg = _cfg(pool_dir, evalsets, objectives=objs,
               budget_evals=4, pareto_points=2, baselines=False)
    # on the 8-device mesh: the pool and every candidate sharded like training params
    summary = run(cfg, out, use_mesh=True, progress=False, log_fn=lambda s: None)
    assert os.path.exists(os.path.join(out, "pareto_front.png"))
    front = np.array([p["val"] for p in summary["pareto"]["front"]])
    allpts = np.array([r["info"]["objectives"] for r in map(json.loads, open(os.path.join(out, LOG_NAME)))
                       if r.get("type") == "candidate"])
    assert len(allpts) == 8
    for p in front:  # nothing evaluated dominates a front point
        assert not np.any(np.all(allpts >= p, axis=1) & np.any(allpts > p, axis=1))
    assert len(summary["pareto"]["per_point_test"]) == 2


def test_unknown_objective_task_is_refused(pool_dir, evalsets, tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'gamma'"):
        run(_cfg(pool_dir, evalsets, objectives=[parse_objective("alpha,gamma")]), str(tmp_path / "x"),
              progress=False, log_fn=lambda s: None)


def test_cli_bad_inputs(pool_dir, evalsets, tmp_path):
    val, test = evalsets
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "ptm.cli", "search", "run", "--val", val, "--test", test,
            "--objective", "alpha", "--out", str(tmp_path / "o")]
    r = subprocess.run(base + ["--pool", *pool_dir["members"], "--budget-evals", "0"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "budget_evals must be >= 1" in r.stderr
    r = subprocess.run(base + ["--pool", pool_dir["members"][0], str(tmp_path / "missing")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
