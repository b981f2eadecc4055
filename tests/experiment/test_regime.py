"""The toy profiles keep the regime of the Merge-to-Learn paper (arXiv 2410.12937, Section 3.2 / Table 1), checked
from the parsed configs alone (no training), so the default job cannot silently drift back to a regime that
tells a different story (docs/toy-suite.md, "The regime").

The paper: every fine-tune (theta_G, skill runs, CFT, RT) trains 2 epochs at one learning rate; |G| = 275k,
|D| = 61k science / 66k safety / 156k coding; five D_i sizes for CFT and RT (n = 5 RT trials); omega grid
0.2 ... 1.0 plus the heuristic |D|/|G|; "best" chosen on validation by the skill score.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ptm.experiment import costs as C
from ptm.experiment.config import load

ROOT = Path(__file__).resolve().parents[2]
PAPER_G = 275_000
PAPER_D = {"science": 61_000, "safety": 66_000, "coding": 156_000}
PAPER_DI_FRACTIONS = (0.1, 0.2, 0.4, 0.8, 1.0)  # configs/experiments/paper_7b.toml
FINE_TUNES = ("general", "skill", "cft", "rt")
MIN_ITEMS = 50  # one answer moves a task score by at most 2 points
RATIO_TOLERANCE = 0.05  # |D|/|G| within 5 % (relative) of the paper's


def _cfg(name: str):
    return load(str(ROOT / f"configs/experiments/{name}.toml"), "/tmp/ptm-regime-test-unused")


def _g(cfg) -> int:
    return cfg.general.examples or cfg.suite.sizes["general"]


def _d(cfg, s) -> int:
    return s.examples or cfg.suite.sizes[s.name]


@pytest.mark.parametrize("name", ["quick", "full"])
def test_every_fine_tune_trains_the_same_epochs_at_one_learning_rate(name):
    kinds = _cfg(name).train.kinds
    assert len({kinds[k].epochs for k in FINE_TUNES}) == 1, {k: kinds[k].epochs for k in FINE_TUNES}
    assert len({kinds[k].learning_rate for k in FINE_TUNES}) == 1
    assert len({kinds[k].warmup_ratio for k in FINE_TUNES}) == 1


@pytest.mark.parametrize("name", ["quick", "full"])
def test_skill_to_general_ratios_are_the_papers(name):
    cfg = _cfg(name)
    assert {s.name for s in cfg.skills} == set(PAPER_D)
    g = _g(cfg)
    assert cfg.suite.sizes["general"] >= g
    for s in cfg.skills:
        d = _d(cfg, s)
        paper = PAPER_D[s.name] / PAPER_G
        assert abs(d / g - paper) <= RATIO_TOLERANCE * paper, (s.name, d, g, d / g, paper)
        assert cfg.suite.sizes[s.name] >= d
        assert max(s.sizes) == d  # the grid ends at the whole D, like the paper's


def test_full_has_the_papers_five_d_i_sizes_and_omega_grid():
    cfg = _cfg("full")
    for s in cfg.skills:
        d = _d(cfg, s)
        assert len(s.sizes) == 5 and C.rt_trials(s.sizes) == 5
        assert [round(x / d, 2) for x in s.sizes] == pytest.approx(PAPER_DI_FRACTIONS, abs=0.01)
    assert cfg.merge.omegas == (0.2, 0.4, 0.6, 0.8, 1.0)
    paper = load(str(ROOT / "configs/experiments/paper_7b.toml"), "/tmp/ptm-regime-test-unused")
    for s in paper.skills:
        assert [x / max(s.sizes) for x in s.sizes] == pytest.approx(PAPER_DI_FRACTIONS)


def test_quick_keeps_a_subset_of_the_papers_d_i_grid():
    cfg = _cfg("quick")
    for s in cfg.skills:
        d = _d(cfg, s)
        assert 2 <= len(s.sizes) <= 5
        for x in s.sizes:
            assert min(abs(x / d - f) for f in PAPER_DI_FRACTIONS) <= 0.01, (s.name, x, d)


@pytest.mark.parametrize("name", ["quick", "full"])
def test_enough_eval_items_and_the_papers_selection(name):
    cfg = _cfg(name)
    assert cfg.suite.sizes["eval"] >= MIN_ITEMS
    assert cfg.eval.max_items_per_task is None or cfg.eval.max_items_per_task >= MIN_ITEMS
    assert cfg.selection == "skill"
    assert cfg.merge.heuristic and "task_arithmetic" in cfg.merge.methods


# ------------------------------------------------------------------ the recycling pool (arXiv 2412.04144)


def test_the_search_pool_is_8_to_16_generalists_of_varied_mixtures_hyperparameters_and_stages():
    from ptm.search.config import SearchConfig
    from ptm.toy.pool import load_pool_config

    pool = load_pool_config(str(ROOT / "configs/search/toy_pool.toml"))
    members = {m["name"]: m for m in pool["member"]}
    assert 8 <= len(members) <= 16
    for m in members.values():  # every member is a generalist: G is in its mixture
        assert any(s["path"] == "general.jsonl" for s in m["sources"]), m["name"]

    def hp(m, k):
        return m.get(k, pool["train"][k])

    assert len({hp(m, "learning_rate") for m in members.values()}) >= 2
    assert len({hp(m, "num_epochs") for m in members.values()}) >= 2
    assert any(m.get("init", "base") != "base" for m in members.values())  # a second stage
    mixtures = {tuple(sorted((s["path"], tuple(s.get("tasks", ())), s.get("rate", 1.0)) for s in m["sources"]))
                for m in members.values()}
    assert len(mixtures) >= 6
    assert any(s.get("tasks") for m in members.values() for s in m["sources"])  # per-task rates of G
    for name in ("toy_search", "toy_pareto"):
        cfg = SearchConfig.from_toml(str(ROOT / f"configs/search/{name}.toml"))
        assert [p.rsplit("/", 1)[1] for p in cfg.pool] == list(members)
    search = SearchConfig.from_toml(str(ROOT / "configs/search/toy_search.toml"))
    assert search.budget_evals >= 8 * len(members)  # several CMA-ES generations for the pool's dimension


def test_pool_sources_can_keep_only_some_tasks(tmp_path):
    import json

    from ptm.errors import ConfigError
    from ptm.toy.pool import _task_subset, load_pool_config

    suite = tmp_path / "suite"
    suite.mkdir()
    recs = [{"task": t, "messages": []} for t in ("copy", "sort", "copy", "lookup")]
    (suite / "general.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    path = _task_subset(suite, tmp_path, {"path": "general.jsonl", "tasks": ["copy", "lookup"]})
    kept = [json.loads(line)["task"] for line in open(path)]
    assert kept == ["copy", "copy", "lookup"]
    assert _task_subset(suite, tmp_path, {"path": "general.jsonl"}) == str(suite / "general.jsonl")
    with pytest.raises(ConfigError, match="no records"):
        _task_subset(suite, tmp_path, {"path": "general.jsonl", "tasks": ["nope"]})
    bad = tmp_path / "pool.toml"
    bad.write_text('model = "toy_2m"\n[suite]\n[base]\nsources = [{ path = "p.jsonl" }]\n'
                   '[[member]]\nname = "a"\nsources = [{ path = "g.jsonl", task = "copy" }]\n')
    with pytest.raises(ConfigError, match="a source needs `path` and may have"):
        load_pool_config(str(bad))
