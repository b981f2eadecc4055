"""Selection, tables and report files from fabricated scores (no training): every number is checked against an
independent computation here, and the Markdown/CSV against results.json."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from ptm.experiment import analysis, report
from ptm.experiment import costs as C
from ptm.experiment.config import load
from ptm.experiment.runner import Experiment

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cfg = load(str(ROOT / "configs/experiments/micro.toml"), str(out))
    exp = Experiment(cfg, log=lambda s: None)
    exp.plan_models(heuristics={s.name: 0.25 + 0.1 * i for i, s in enumerate(cfg.skills)})
    rng = random.Random(7)
    for i, r in enumerate(exp.runs):
        exp.run_costs[r.id] = C.RunCost(examples=10 + i, examples_seen=20 + 2 * i, steps=1 + i)
    all_tasks = list(cfg.eval.general_tasks) + [t for s in cfg.skills for t in s.tasks + s.benign_tasks]
    for split in ("validation", "test"):
        for mid in exp.models:
            exp.scores[split][mid] = {"tasks": {t: rng.randrange(0, 21) / 20 for t in all_tasks}}
    cos = {
        "science+safety": {"layers": [0.1, 0.2], "total": 0.15},
        "science+coding": {"layers": [0.3, -0.1], "total": 0.05},
        "safety+coding": {"layers": [0.5, 0.4], "total": 0.45},
    }
    res = analysis.analyze(exp, cosines=cos)
    paths = report.write_report(res, str(out))
    return exp, res, out, paths


def _mean(rec, tasks):
    return 100 * sum(rec["tasks"][t] for t in tasks) / len(tasks)


def test_selection_is_best_by_validation_skill_score(study):
    exp, res, _, _ = study
    for s in exp.cfg.skills:
        val = exp.scores["validation"]
        for method, prefix in (
            ("cft", f"cft_{s.name}_"),
            ("rt", f"rt_{s.name}_"),
            ("task_arithmetic", f"ptm_task_arithmetic_{s.name}_w"),
        ):
            cands = [m for m in exp.models if m.startswith(prefix)]
            best = max(_mean(val[m], s.tasks) for m in cands)
            chosen = res["selection"][s.name]["best"][method]
            assert chosen in cands and _mean(val[chosen], s.tasks) == best
        assert (
            res["selection"][s.name]["heuristic"]["task_arithmetic"]
            == f"ptm_task_arithmetic_{s.name}_heuristic"
        )


def test_table2_and_3_numbers(study):
    exp, res, _, _ = study
    for s in exp.cfg.skills:
        rows = {r["label"]: r for r in res["tables"]["table2"][s.name]}
        base = rows["Instruction-tuned (theta_G)"]
        assert base["general"] == pytest.approx(
            _mean(exp.scores["test"]["general"], exp.cfg.eval.general_tasks)
        )
        cft = rows["Best CFT"]
        assert cft["skill"] == pytest.approx(_mean(exp.scores["test"][cft["model"]], s.tasks))
        assert cft["steps"] == sum(exp.run_costs[f"cft_{s.name}_{n}"].steps for n in s.sizes)
        assert rows["Best RT"]["examples"] == sum(exp.run_costs[f"rt_{s.name}_{n}"].examples for n in s.sizes)
        assert rows["Best PTM (task arithmetic)"]["steps"] == exp.run_costs[f"skill_{s.name}"].steps
        assert rows["PTM heuristic omega (D/G)"]["omega"] == exp.heuristics[s.name]
        for r in res["tables"]["table3"][s.name]:
            t2 = rows[r["label"]]
            if base["general"]:
                assert r["general_pct"] == pytest.approx(
                    100 * (t2["general"] - base["general"]) / base["general"]
                )
            assert r["skill_delta"] == pytest.approx(t2["skill"] - base["skill"])


def test_table4_and_5(study):
    exp, res, _, _ = study
    t4 = {r["model"]: r for r in res["tables"]["table4"]}
    assert {"general", "cft_all", "rt_all", "multi_task_arithmetic_heuristic"} <= set(t4)
    assert t4["multi_task_arithmetic_heuristic"]["steps"] == sum(
        exp.run_costs[f"skill_{s.name}"].steps for s in exp.cfg.skills
    )
    assert t4["rt_all"]["benign"] == pytest.approx(_mean(exp.scores["test"]["rt_all"], ["safety_benign"]))
    t5 = {r["model"]: r for r in res["tables"]["table5"]}
    assert set(t5) == {"pair_science+safety", "pair_science+coding", "pair_safety+coding"}
    assert t5["pair_safety+coding"]["cosine"] == 0.45
    assert t5["pair_science+coding"]["skills"]["coding"] == pytest.approx(
        _mean(exp.scores["test"]["pair_science+coding"], ["coding"])
    )


def test_files_hold_the_json_numbers(study):
    _, res, out, paths = study
    for name in ("results.json", "results.csv", "tables.md", report.FIG1, report.FIG3, report.FIG_COS):
        assert str(out / name) in paths and (out / name).stat().st_size > 0
    for png in (report.FIG1, report.FIG3, report.FIG_COS):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    disk = json.loads((out / "results.json").read_text())
    assert disk["tables"] == json.loads(json.dumps(res["tables"]))
    md = (out / "tables.md").read_text()
    for s, rows in disk["tables"]["table2"].items():
        section = md.split(f"### {s}\n", 1)[1].split("\n\n", 1)[0].strip()  # the table under the heading
        for r, line in zip(rows, section.splitlines()[2:], strict=True):
            assert line.startswith(f"| {r['label']} | {r['general']:.1f} | {r['skill']:.1f} |"), (s, r, line)
            assert f"| {r['steps']:,} | {r['examples']:,} |" in line
    for r in disk["tables"]["table5"]:
        assert f"{r['cosine']:.4f}" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == sum(
        (m["validation"] is not None) + (m["test"] is not None) for m in disk["models"].values()
    )
    for row in rows:
        agg = disk["models"][row["model"]][row["split"]]
        assert float(row["general"]) == agg["general"]
        for s, v in agg["skills"].items():
            assert float(row[f"skill:{s}"]) == v
        for t, v in agg["tasks"].items():
            assert float(row[f"task:{t}"]) == v


def test_headline_shows_the_five_rows_and_the_cost_ratio(study):
    exp, res, out, _ = study
    text = report.headline(res)
    assert text in (out / "tables.md").read_text()
    assert f"{exp.cfg.eval.max_items_per_task} items per task" in text.splitlines()[0]
    blocks = text.split("\n")[1:]
    for s in exp.cfg.skills:
        rows = {r["label"]: r for r in res["tables"]["table2"][s.name]}
        i = next(j for j, line in enumerate(blocks) if line.startswith(f"{s.name}: heuristic omega"))
        assert f"RT n = {len(s.sizes)} trial(s)" in blocks[i]
        body = blocks[i + 2 : i + 7]
        for (label, name), line in zip(report.HEADLINE_ROWS, body, strict=True):
            r = rows[label]
            fields = line[len(f"  {name:<26}") :].split()
            assert line.startswith(f"  {name}"), line
            assert fields[0] == f"{r['general']:.1f}" and fields[1] == f"{r['skill']:.1f}", line
            if s.benign_tasks:
                assert fields[2] == f"{r['benign']:.1f}", line
            assert f" {r['steps']:,} " in line and f" {r['examples']:,} " in line
        assert f"omega {rows['PTM heuristic omega (D/G)']['omega']:.3g}" in body[4]
        ptm, rt = rows["Best PTM (task arithmetic)"], rows["Best RT"]
        ratio = blocks[i + 7]
        assert ratio.startswith("  PTM / RT cost: steps ")
        assert f"{ptm['steps']:,} / {rt['steps']:,} = {100 * ptm['steps'] / rt['steps']:.0f} %" in ratio
        assert f"{ptm['examples']:,} / {rt['examples']:,}" in ratio
