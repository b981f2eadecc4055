"""The micro profile end to end in real subprocesses: killed with SIGKILL mid-study, rerun, it reuses every
finished stage and completes; a third run trains and evaluates nothing; a changed setting is refused."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptm.errors import ConfigError
from ptm.experiment import costs as C
from ptm.experiment.config import load
from ptm.experiment.runner import Experiment

pytestmark = pytest.mark.slow  # two real `ptm experiment` processes: ~45-65 s on 2 cores

ROOT = Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "configs/experiments/micro.toml")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One CPU device: the study's logic is under test here (sharded training is tested in tests/train),
    # and one device compiles faster on two cores.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def _complete(run_json: Path) -> bool:
    try:
        return json.loads(run_json.read_text()).get("complete") is True
    except (OSError, ValueError):  # not there yet, or being written
        return False


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "ptm.cli", "experiment", MICRO, "--results-dir", str(out)]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    log1 = out.parent / f"{out.name}-run1.log"
    # Run 1: killed (SIGKILL) as soon as the first skill run has finished.
    with open(log1, "w") as f:
        p = subprocess.Popen(_cmd(out), stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        marker = out / "runs" / "skill_science" / "run.json"
        deadline = time.time() + 240
        while not _complete(marker) and p.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL, log1.read_text()[-3000:]
    assert marker.exists() and not (out / "tables.md").exists()
    mtimes = {r: (out / "runs" / r / "run.json").stat().st_mtime for r in ("pre", "general", "skill_science")}
    # Run 2: resumes and finishes.
    p2 = subprocess.run(_cmd(out), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert p2.returncode == 0, p2.stderr[-3000:]
    return out, p2.stderr + p2.stdout, mtimes


def test_resume_reuses_finished_stages(micro):
    out, log, mtimes = micro
    for r, t in mtimes.items():
        assert f"train {r}: done before, reused" in log
        assert (out / "runs" / r / "run.json").stat().st_mtime == t  # not retrained
    assert "train cft_science_8 ..." in log  # the rest was trained in the second run
    cfg = load(MICRO, str(out))
    exp = Experiment(cfg)
    for r in exp.runs:
        assert json.loads((out / "runs" / r.id / "run.json").read_text())["complete"] is True


def test_every_stage_produced_its_output(micro):
    out, _, _ = micro
    res = json.loads((out / "results.json").read_text())
    groups = {m["group"] for m in res["models"].values()}
    assert groups == {
        "pre",
        "general",
        "skill_only",
        "cft",
        "rt",
        "ptm",
        "multi",
        "pairwise",
        "cft_all",
        "rt_all",
    }
    methods = {m["method"] for m in res["models"].values() if m["group"] == "ptm"}
    assert methods == {"task_arithmetic", "linear_interpolation", "wise_ft"}
    assert all(m["validation"] is not None for m in res["models"].values())
    for mid in ("general", "multi_ties_heuristic", "multi_dare_heuristic", "pair_safety+coding"):
        assert res["models"][mid]["test"] is not None
    assert len(res["cosine"]) == 3 and all(len(v["layers"]) == 2 for v in res["cosine"].values())
    for name in (
        "tables.md",
        "results.csv",
        "figure1_tradeoff.png",
        "figure3_merge_methods.png",
        "cosine_layers.png",
    ):
        assert (out / name).stat().st_size > 0
    # scores are cached per model and split
    assert len(list((out / "scores" / "validation").glob("*.json"))) == len(res["models"])


def test_costs_match_the_paper_formulas(micro):
    out, _, _ = micro
    res = json.loads((out / "results.json").read_text())
    runs = {k: C.RunCost(**v) for k, v in res["runs"].items()}
    g = runs["general"].examples
    cfg = load(MICRO, str(out))
    for s in cfg.skills:
        f = res["formula_examples"][s.name]
        assert f["cft"] == sum(runs[f"cft_{s.name}_{n}"].examples for n in s.sizes) == sum(s.sizes)
        assert (
            f["rt"]
            == sum(runs[f"rt_{s.name}_{n}"].examples for n in s.sizes)
            == len(s.sizes) * g + sum(s.sizes)
        )
        assert f["ptm"] == runs[f"skill_{s.name}"].examples == s.examples
        rows = {r["label"]: r for r in res["tables"]["table2"][s.name]}
        assert rows["Best CFT"]["steps"] == sum(runs[f"cft_{s.name}_{n}"].steps for n in s.sizes)
        assert rows["Best PTM (task arithmetic)"]["examples"] == s.examples
        assert res["heuristic_omegas"][s.name] == pytest.approx(s.examples / g)
    rows = list(csv.DictReader((out / "results.csv").open()))
    for row in rows:
        agg = res["models"][row["model"]][row["split"]]
        assert float(row["general"]) == agg["general"]


def test_third_run_does_nothing_new(micro):
    out, _, _ = micro
    before = json.loads((out / "results.json").read_text())
    lines: list[str] = []
    cfg = dataclasses.replace(
        load(MICRO, str(out)), compilation_cache=False
    )  # leave this process's jax alone
    res = Experiment(cfg, log=lines.append).run()
    trains = [ln for ln in lines if " train " in ln]
    assert trains and all("reused" in ln for ln in trains)
    assert not [ln for ln in lines if " eval " in ln]  # every score came from the cache
    assert json.loads(json.dumps(res["tables"])) == before["tables"]


def test_changed_setting_is_refused(micro):
    out, _, _ = micro
    cfg = load(MICRO, str(out))
    kinds = dict(cfg.train.kinds)
    kinds["general"] = dataclasses.replace(kinds["general"], learning_rate=1e-4)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, kinds=kinds), compilation_cache=False)
    before = (out / "runs" / "general" / "run.json").read_bytes()
    with pytest.raises(ConfigError, match=r"runs/general.*different settings.*hyper"):
        Experiment(cfg, log=lambda s: None).run()
    assert (out / "runs" / "general" / "run.json").read_bytes() == before
