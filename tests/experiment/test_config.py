"""Experiment TOML parsing: the shipped profiles, the paper's 7B setting, and clear errors for bad input."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ptm.errors import ConfigError
from ptm.experiment.config import load, parse
from ptm.experiment.plan import plan_runs, wise_ft_run
from ptm.model.llama import param_count

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "configs" / "experiments"


@pytest.mark.parametrize("name", ["micro", "quick", "full", "paper_7b"])
def test_profiles_parse(name):
    cfg = load(str(PROFILES / f"{name}.toml"))
    assert cfg.name == name
    assert cfg.results_dir.endswith(f"results/{name}")
    runs = plan_runs(cfg)
    ids = [r.id for r in runs]
    assert len(ids) == len(set(ids))
    # every skill has its skill run, its CFT and RT grid, and the WiSE-FT CFT run on the whole D
    for s in cfg.skills:
        assert f"skill_{s.name}" in ids
        for n in s.sizes:
            assert f"cft_{s.name}_{n}" in ids and f"rt_{s.name}_{n}" in ids
        if "wise_ft" in cfg.merge.methods:
            assert wise_ft_run(cfg, s.name) in ids
    # runs come in the paper's order: base before G before skills before CFT before RT
    kinds = [r.kind for r in runs]
    assert kinds.index("general") < kinds.index("skill") < kinds.index("cft") < kinds.index("rt")


def test_paper_7b_is_the_paper_setting(monkeypatch):
    cfg = load(str(PROFILES / "paper_7b.toml"))
    m, t = cfg.model, cfg.train
    assert 6.5e9 < param_count(m) < 7.0e9  # Llama 2 7B
    assert (t.seq_len, t.global_batch_size) == (4096, 128)
    for kind in ("general", "skill", "cft", "rt"):
        assert t.kinds[kind].epochs == 2 and t.kinds[kind].learning_rate == 2e-5
    devices = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    assert devices == 128  # v3-128
    micro = t.global_batch_size // t.grad_accum_steps
    assert micro % (cfg.mesh.data * cfg.mesh.fsdp) == 0
    assert m.num_heads % cfg.mesh.tensor == 0 and t.seq_len <= m.max_seq_len
    assert cfg.merge.omegas == (0.2, 0.4, 0.6, 0.8, 1.0)
    assert not cfg.base.pretrain and cfg.tokenizer != "byte"
    for s in cfg.skills:  # five increasing D_i per skill, as in the paper
        assert len(s.sizes) == 5 and list(s.sizes) == sorted(s.sizes) and s.sizes[0] > 1000
    # every data path comes from the user's $PTM_DATA; unset, resolving names the variable problem
    monkeypatch.delenv("PTM_DATA", raising=False)
    with pytest.raises(ConfigError, match="environment variable"):
        cfg.resolve(cfg.general.data)


def test_paper_7b_paths_expand_from_env(monkeypatch):
    monkeypatch.setenv("PTM_DATA", "gs://bucket/ptm")
    cfg = load(str(PROFILES / "paper_7b.toml"))
    assert cfg.resolve(cfg.skill("science").data) == "gs://bucket/ptm/sciriff_train.jsonl"
    assert cfg.tokenizer_spec() == "gs://bucket/ptm/tokenizer.model"


def _micro() -> dict:
    return tomllib.loads((PROFILES / "micro.toml").read_text())


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda d: d.update(bogus=1), r"bogus"),
        (lambda d: d["train"].update(seq_len="long"), r"train\.seq_len"),
        (lambda d: d["skills"]["science"].update(sizes=[8, 99]), r"skills\.science\.sizes"),
        (lambda d: d["skills"]["science"].update(tasks=[]), r"skills\.science\.tasks"),
        (lambda d: d["merge"].update(methods=["wise_ft", "magic"]), r"merge\.methods.*magic"),
        (lambda d: d["merge"].update(omegas=[0.5, -1]), r"merge\.omegas"),
        (lambda d: d.update(base={"pretrain": True}), r"\[base\]"),
        (lambda d: d["model"].update(num_kv_heads=3), r"\[model\]"),
        (lambda d: d["train"].update(global_batch_size=12) or d.update(mesh={"fsdp": 8}), r"divisible"),
        (lambda d: d["eval"].update(general_tasks=["copy", "science"]), r"both general and skill"),
        (lambda d: d.pop("general"), r"general"),
        (lambda d: d["model"].update(vocab_size=259), r"vocab_size=259 < 1024.*tokenizer\.model"),
    ],
)
def test_bad_configs_name_the_file_and_key(mutate, pattern):
    d = _micro()
    mutate(d)
    with pytest.raises(ConfigError, match=pattern) as e:
        parse(d, "my/exp.toml")
    assert "my/exp.toml" in str(e.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="no such"):
        load(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load(str(bad))


def test_relative_paths_resolve_against_the_suite(tmp_path):
    cfg = parse(_micro(), str(tmp_path / "x.toml"), results_dir=str(tmp_path / "res"))
    assert cfg.resolve("general.jsonl") == str(tmp_path / "res" / "suite" / "general.jsonl")
    assert cfg.resolve("/abs/g.jsonl") == "/abs/g.jsonl"
    d = _micro()
    del d["suite"]
    cfg = parse(d, str(tmp_path / "x.toml"))
    assert cfg.resolve("g.jsonl") == str(tmp_path / "g.jsonl")


def test_heuristic_point_and_grid_sizes_are_sensible():
    for name in ("quick", "full"):
        cfg = load(str(PROFILES / f"{name}.toml"))
        for s in cfg.skills:
            assert s.examples is None or all(n <= s.examples for n in s.sizes)
        assert all(0 < w <= 1 for w in cfg.merge.omegas)
    full = load(str(PROFILES / "full.toml"))
    assert full.merge.omegas == (0.2, 0.4, 0.6, 0.8, 1.0)


def test_cli_check_prints_the_plan(capsys):
    from ptm.cli import main

    assert main(["experiment", str(PROFILES / "full.toml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "train rt_coding_907" in out and "init=@pre" in out
    assert main(["experiment", str(PROFILES / "nope.toml"), "--check"]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_paper_7b_evaluates_like_the_paper():
    """General ability through lm-eval (MMLU, GSM8K, BBH, TruthfulQA MC), coding by executed HumanEval and MBPP+
    (pass@10 of 20 samples at T 0.8), safety on native refusal sets; every task has a validation source."""
    from ptm.experiment.task_specs import parse_spec

    cfg = load(str(PROFILES / "paper_7b.toml"))
    general = [parse_spec(t, "general") for t in cfg.eval.general_tasks]
    assert [(t.kind, t.name) for t in general] == [
        ("lm_eval", "mmlu"), ("lm_eval", "gsm8k"), ("lm_eval", "bbh_cot_fewshot"), ("lm_eval", "truthfulqa_mc1")]
    coding = [parse_spec(t, "coding") for t in cfg.skill("coding").tasks]
    assert [t.kind for t in coding] == ["code", "code"] and coding[0].name == "humaneval"
    c = cfg.eval.code
    assert c.allow_code_execution and (c.samples, c.k, c.temperature, c.top_p) == (20, 10, 0.8, 0.95)
    assert c.humaneval_validation and "{split}" in coding[1].name
    assert cfg.eval.lm_eval.include and cfg.eval.lm_eval.chat_template
    assert cfg.skill("safety").benign_tasks == ("xstest_safe",) and "xstest_unsafe" in cfg.skill("safety").tasks
