"""Experiment tasks beyond the eval-set format: `lm_eval:TASK` (lm-evaluation-harness over the shipped toy task
YAMLs) and `code:FILE` (problems executed in the sandbox) feed the study's scores, tables and selection; each split
scores its own documents, and the numbers equal `ptm eval --lm-eval ... --lm-eval-split S` / `--code-eval FILE`
(on 1 process and as one SPMD program of 2). The same study on 2 processes gives the 1-process score files, tables
and CSV, its sandbox executions split over the processes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ptm.errors import ConfigError
from ptm.experiment.config import parse
from ptm.experiment.task_specs import parse_spec
from ptm.toml_file import load_toml

from ..scale.cluster import start_cli, wait_all

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "configs/experiments/micro.toml"
TOY_TASKS = ROOT / "configs/lm_eval/toy"
LM_TASK = "lm_eval:ptm_toy_world_qa_mc"
PROBE = "lm_eval:probe"  # a task whose score does not depend on the model (see _docs)


def _micro(**eval_extra) -> dict:
    d = load_toml(str(MICRO), "experiment config")
    d["eval"].update(eval_extra)
    return d


# ------------------------------------------------------------------------------------------ config (no jax)


def test_task_specs_parse_and_refuse_what_would_select_on_test():
    assert parse_spec("science", "k").kind == "native"
    s = parse_spec("lm_eval:gsm8k:exact_match,strict-match", "k")
    assert (s.kind, s.name, s.metric) == ("lm_eval", "gsm8k", "exact_match,strict-match")
    c = parse_spec("code:data/{split}/mbpp.jsonl", "k")
    assert c.kind == "code" and c.code_file("validation", None) == "data/validation/mbpp.jsonl"
    h = parse_spec("humaneval", "k")
    assert h.code_file("test", "v.jsonl") is None and h.code_file("validation", "v.jsonl") == "v.jsonl"
    with pytest.raises(ConfigError, match=r"skills.x.tasks: 'code:a.jsonl'.*\{split\}"):
        parse_spec("code:a.jsonl", "skills.x.tasks")
    with pytest.raises(ConfigError, match="unknown task kind"):
        parse_spec("lmeval:gsm8k", "k")
    with pytest.raises(ConfigError, match="no lm-eval task name"):
        parse_spec("lm_eval:", "k")


def test_code_tasks_need_the_explicit_opt_in_and_humaneval_a_validation_file():
    d = _micro()
    d["skills"]["coding"]["tasks"] = ["coding", "code:/x/{split}/p.jsonl"]
    with pytest.raises(ConfigError, match=r"skills.coding.tasks: 'code:/x/\{split\}/p.jsonl' executes .*"
                                          r"allow_code_execution = true"):
        parse(d, "m.toml")
    d["eval"]["code"] = {"allow_code_execution": True}
    cfg = parse(d, "m.toml")
    assert cfg.eval.code.allow_code_execution and cfg.eval.code.k == 10 and cfg.eval.code.samples == 20
    d["skills"]["coding"]["tasks"] = ["humaneval"]
    with pytest.raises(ConfigError, match="humaneval_validation"):
        parse(d, "m.toml")
    d["eval"]["code"] = {"allow_code_execution": True, "humaneval_validation": "v.jsonl", "k": 30}
    with pytest.raises(ConfigError, match=r"eval.code.k: pass@30 needs at least k samples"):
        parse(d, "m.toml")
    d["eval"]["code"] = {"allow_code_execution": True, "bogus": 1}
    with pytest.raises(ConfigError, match=r"eval.code.bogus: unknown key"):
        parse(d, "m.toml")
    d["eval"]["code"] = {"allow_code_execution": True}
    d["eval"]["lm_eval"] = {"include": ["a"], "num_fewshot": -1}
    with pytest.raises(ConfigError, match=r"eval.lm_eval.num_fewshot"):
        parse(d, "m.toml")


def test_missing_problem_files_and_include_dirs_stop_the_study_before_training(tmp_path):
    from ptm.errors import DataError
    from ptm.experiment.runner import Experiment

    d = _micro(code={"allow_code_execution": True},
               lm_eval={"include": [str(tmp_path / "no_tasks")]} if importlib.util.find_spec("lm_eval") else {})
    d["skills"]["coding"]["tasks"] = ["coding", f"code:{tmp_path}/{{split}}/p.jsonl"]
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "p.jsonl").write_text("{}\n")
    if importlib.util.find_spec("lm_eval"):
        d["eval"]["general_tasks"] = ["copy", LM_TASK]
    exp = Experiment(parse(d, str(tmp_path / "m.toml"), str(tmp_path / "out")), log=lambda s: None)
    with pytest.raises(DataError) as e:
        exp.prepare_data()
    msg = str(e.value)
    assert f"{tmp_path}/test/p.jsonl (task code:{tmp_path}/{{split}}/p.jsonl, test)" in msg
    assert "validation/p.jsonl" not in msg
    if importlib.util.find_spec("lm_eval"):
        assert f"{tmp_path}/no_tasks ([eval.lm_eval] include)" in msg
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained


# ------------------------------------------------------------------------------------------ lm-eval splits


needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval not installed (pip install 'ptm[lm_eval]')")


def _yaml(d: Path, task: str, splits: dict[str, str]) -> None:
    """A multiple-choice task over local files: docs {"q", "choices", "target"}."""
    files = "".join(f'    {k}: "{v}"\n' for k, v in splits.items())
    keys = "".join(f"{k}_split: {k}\n" for k in splits)
    (d / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{files}output_type: multiple_choice\n"
        f"{keys}doc_to_text: '{{{{q}}}}'\ndoc_to_choice: '{{{{choices}}}}'\ndoc_to_target: target\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")


def _docs(path: Path, targets: list[int]) -> None:
    """Choice 0 is one letter, choice 1 two hundred: any model gives 0 the higher log-likelihood, so acc is the
    fraction of docs whose target is 0, whatever the (random) weights."""
    path.write_text("".join(json.dumps({"q": f"Question {i}?", "choices": ["a", "zq" * 100], "target": t}) + "\n"
                            for i, t in enumerate(targets)))


@needs_lm_eval
def test_select_split_refuses_tasks_without_distinct_validation_and_test(tmp_path):
    from ptm.eval import lm_eval_model as L

    _docs(tmp_path / "validation.jsonl", [0, 1])
    _docs(tmp_path / "test.jsonl", [0, 1, 1])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _yaml(tasks, "both", {"validation": tmp_path / "validation.jsonl", "test": tmp_path / "test.jsonl"})
    _yaml(tasks, "only_val", {"validation": tmp_path / "validation.jsonl"})
    _yaml(tasks, "same", {"validation": tmp_path / "test.jsonl", "test": tmp_path / "test.jsonl"})
    tm = L.task_manager([str(tasks)], ["both", "only_val", "same"])
    (val,) = L.select_split(tm, ["both"], "validation")
    assert [d["target"] for d in val.eval_docs] == [0, 1]
    (test,) = L.select_split(tm, ["both"], "test")
    assert [d["target"] for d in test.eval_docs] == [0, 1, 1]
    with pytest.raises(ConfigError, match="lm-eval task only_val: has no test_split"):
        L.select_split(tm, ["only_val"], "validation")
    with pytest.raises(ConfigError, match="lm-eval task same: validation_split and test_split are the same data"):
        L.select_split(tm, ["same"], "validation")
    with pytest.raises(ConfigError, match="expected one of"):
        L.select_split(tm, ["both"], "train")


@needs_lm_eval
def test_the_staged_benchmark_yamls_have_distinct_validation_and_test_splits(tmp_path):
    """configs/lm_eval/staged (what paper_7b.toml's general tasks are modelled on) passes select_split on both
    splits given files of the documented layout."""
    from ptm.eval import lm_eval_model as L

    docs = {
        "gsm8k": ("gsm8k/{s}.jsonl", {"question": "1+1?", "answer": "2 #### 2"}, ("train", "validation", "test")),
        "mmlu_astronomy": ("mmlu/astronomy/{s}.jsonl", {"question": "Q?", "choices": ["a", "b", "c", "d"],
                                                        "answer": 1}, ("dev", "validation", "test")),
        "truthfulqa_mc1": ("truthfulqa/{s}.jsonl", {"question": "Q?", "mc1_targets": {"choices": ["a", "b"],
                                                                                     "labels": [1, 0]}},
                           ("validation", "test")),
    }
    for pattern, doc, splits in docs.values():
        for i, sp in enumerate(splits):
            f = tmp_path / pattern.format(s=sp)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("".join(json.dumps(doc) + "\n" for _ in range(i + 1)))
    root, staged = L.stage_task_dirs([ROOT / "configs/lm_eval/staged"], str(tmp_path))
    try:
        tm = L.task_manager(staged, list(docs))
        for split, n in (("validation", 2), ("test", 3)):
            for task in L.select_split(tm, list(docs), split):
                want = n - (task.config.task == "truthfulqa_mc1")  # it has no few-shot split before them
                assert len(task.eval_docs) == want, (task.config.task, split)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_lm_eval
def test_datasets_cache_sends_the_arrow_cache_to_the_given_dir(tmp_path):
    """What keeps lm-eval's task loading off the user's (possibly shared) ~/.cache in a study: every process
    caches the task files in a temporary directory of its own."""
    import datasets

    from ptm.experiment.extra_eval import datasets_cache

    f = tmp_path / "d.jsonl"
    f.write_text('{"a": 1}\n{"a": 2}\n')
    before = datasets.config.HF_DATASETS_CACHE
    with datasets_cache(str(tmp_path / "cache")):
        assert len(datasets.load_dataset("json", data_files=str(f), split="train")) == 2
    assert list((tmp_path / "cache").rglob("*.arrow"))
    assert datasets.config.HF_DATASETS_CACHE == before


# ------------------------------------------------------------------------------------------ end to end



def _problems(d: Path) -> dict[str, float]:
    """HumanEval-format problems whose outcome does not depend on the (random) model: the prompt is a whole
    function ending in a comment, generation stops at a newline, so a completion stays inside the comment.
    validation: 1 of 2 correct, test: 2 of 3 -> pass@1 0.5 / 0.667."""

    def prob(i: int, ok: bool) -> dict:
        body = f"def add(a, b):\n    return a {'+' if ok else '-'} b  # "
        return {"task_id": f"t/{i}", "entry_point": "add", "prompt": body,
                "test": "def check(f):\n    assert f(2, 3) == 5\n", "canonical_solution": ""}

    layout = {"validation": [True, False], "test": [True, False, True]}
    for split, oks in layout.items():
        (d / split).mkdir(parents=True)
        (d / split / "add.jsonl").write_text("".join(json.dumps(prob(i, ok)) + "\n" for i, ok in enumerate(oks)))
    return {s: sum(o) / len(o) for s, o in layout.items()}


# The micro profile cut to one skill, one CFT/RT size and task arithmetic at omega 1 (+ heuristic): 5 one-step
# runs, 7 models. A general lm-eval task and a skill code task next to eval-set tasks.
EXTRA_TOML = """
name = "extra"
tokenizer = "tokenizer.model"
[suite]
sizes = {{ pretrain = 64, general = 48, science = 16, safety = 4, coding = 4, eval = 3 }}
[base]
data = "pretrain.jsonl"
[general]
data = "general.jsonl"
[skills.science]
data = "science.jsonl"
examples = 16
sizes = [16]
tasks = ["science", "{code}"]
[eval]
validation = "eval/validation"
test = "eval/test"
general_tasks = ["copy", "{lm}", "{probe}"]
max_items_per_task = 3
max_new_tokens = 4
batch_size = 16
[eval.lm_eval]
include = ["{include}", "{probe_dir}"]          # ${{PTM_LM_EVAL_DATA}} defaults to the data root: the generated suite
[eval.code]
allow_code_execution = true
samples = 2
k = 1
max_new_tokens = 3
stops = ["\\n", "\\r"]
timeout_s = 5.0
workers = 2
[merge]
omegas = [1.0]
methods = ["task_arithmetic"]
multi_skill = false
pairwise = false
[model]
preset = "toy_micro"
[train]
seq_len = 128
global_batch_size = 128
save_every = 1
epochs = 1
learning_rate = 3e-3
warmup_ratio = 0.0
"""


def _env(hf_cache: Path) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(ROOT),
            "HF_DATASETS_CACHE": str(hf_cache)}


@pytest.fixture(scope="module")
def extra_study(tmp_path_factory):
    """The study (code task, lm-eval toy task and probe) on 1 process x 2 devices: what the 2-process run must
    equal, and what `ptm eval` is compared with. HF_DATASETS_CACHE points at a directory that must stay unused
    (the study gives lm-eval's `datasets` a temporary cache of its own)."""
    base = tmp_path_factory.mktemp("extra")
    code_dir = base / "code"
    want = _problems(code_dir)
    probe_dir = base / "probe"
    probe_dir.mkdir()
    _docs(probe_dir / "validation.jsonl", [0, 0])  # acc 1 on validation, 2/3 on test
    _docs(probe_dir / "test.jsonl", [0, 1, 0])
    _yaml(probe_dir, "probe", {"validation": probe_dir / "validation.jsonl", "test": probe_dir / "test.jsonl"})
    toml = base / "extra.toml"
    code_task = f"code:{code_dir}/{{split}}/add.jsonl"
    toml.write_text(EXTRA_TOML.format(lm=LM_TASK, code=code_task, include=TOY_TASKS, probe=PROBE,
                                      probe_dir=probe_dir))
    hf = base / "hf_datasets"
    out = base / "results"
    procs = start_cli(["experiment", str(toml), "--results-dir", str(out)], base / "one", num_processes=1,
                      devices_per_process=2, env_extra={"HF_DATASETS_CACHE": str(hf)}, cwd=ROOT)
    wait_all(procs, base / "one", timeout=900)
    return SimpleNamespace(base=base, toml=toml, out=out, hf=hf, code_dir=code_dir, code_task=code_task,
                           want=want, probe_dir=probe_dir, want_probe={"validation": 1.0, "test": 2 / 3})


@needs_lm_eval
@pytest.mark.slow  # a real `ptm experiment` (5 one-step runs, 7 models) and two `ptm eval` runs: ~60-90 s
def test_lm_eval_and_code_tasks_feed_the_study_and_equal_ptm_eval(extra_study, tmp_path):
    S = extra_study
    out, code_dir, code_task, want, want_probe, probe_dir = (S.out, S.code_dir, S.code_task, S.want, S.want_probe,
                                                              S.probe_dir)
    assert not S.hf.exists()  # lm-eval's datasets cache went to the study's own temporary directory

    res = json.loads((out / "results.json").read_text())
    for mid, m in res["models"].items():
        for split in ("validation", "test"):
            if m[split] is None:
                continue
            t = m[split]["tasks"]
            assert LM_TASK in t and code_task in t, (mid, split, sorted(t))
            assert t[code_task] == pytest.approx(100 * want[split]), (mid, split)  # its own split's problems
            assert t[PROBE] == pytest.approx(100 * want_probe[split]), (mid, split)  # its own split's documents
            assert m[split]["general"] == pytest.approx((t["copy"] + t[LM_TASK] + t[PROBE]) / 3)
            assert m[split]["skills"]["science"] == pytest.approx((t["science"] + t[code_task]) / 2)
    rec = {s: json.loads((out / "scores" / s / "general.json").read_text()) for s in ("validation", "test")}
    for s in rec:
        assert rec[s]["extra"][LM_TASK]["metric"] == "acc,none" and rec[s]["n_items"][LM_TASK] == 3
        assert rec[s]["extra"][code_task]["file"] == f"{code_dir}/{s}/add.jsonl"
    rows = list(csv.DictReader(open(out / "results.csv")))
    g = next(r for r in rows if r["model"] == "general" and r["split"] == "test")
    assert float(g[f"task:{LM_TASK}"]) == pytest.approx(100 * rec["test"]["tasks"][LM_TASK], abs=0.01)
    tables = (out / "tables.md").read_text()
    row2 = res["tables"]["table2"]["science"][0]
    assert row2["model"] == "general" and row2["general"] == pytest.approx(res["models"]["general"]["test"]["general"])
    assert f"{row2['general']:.1f}" in tables

    # A rerun reuses every score: the fingerprints (which include the lm-eval / code settings) are stable.
    from ptm.experiment.config import load
    from ptm.experiment.runner import Experiment
    from ptm.experiment.task_specs import by_kind

    exp = Experiment(load(str(S.toml), str(out)), log=lambda s: None)
    exp.plan_models()
    for split in ("validation", "test"):
        for f in (out / "scores" / split).glob("*.json"):
            m = exp.models[f.stem]
            tasks = exp.tasks_for(m)
            native = [t.spec for t in by_kind(tasks)["native"]]
            fp = exp._fingerprint(m, tasks, len(exp._eval_items(split, native)), split)
            assert json.loads(f.read_text())["fingerprint"] == fp, (split, f.stem)

    # The same numbers from `ptm eval` on the study's theta_G checkpoint, split by split: validation as one SPMD
    # program of 2 processes x 1 device (global mesh; the code executions split over them), test on 1 process.
    for split, nproc in (("validation", 2), ("test", 1)):
        j = tmp_path / f"eval_{split}.json"
        cmd = [sys.executable, "-m", "ptm.cli", "eval", str(out / "runs" / "general"),
               "--lm-eval", "ptm_toy_world_qa_mc,probe", "--lm-eval-include", str(TOY_TASKS),
               "--lm-eval-include", str(probe_dir),
               "--lm-eval-data", str(out / "suite"), "--apply-chat-template", "--lm-eval-limit", "3",
               "--lm-eval-split", split, "--code-eval", str(code_dir / split / "add.jsonl"),
               "--allow-code-execution", "--code-samples", "2", "--code-k", "1", "--code-max-new-tokens", "3",
               "--code-stop", "\n", "--code-stop", "\r", "--code-timeout", "5", "--code-workers", "2",
               "--batch-size", "16", "--out", str(j)]
        if nproc == 1:
            q = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path / "hf"), cwd=ROOT,
                               timeout=600)
            assert q.returncode == 0, q.stderr[-4000:]
        else:
            logs = tmp_path / f"eval_{split}"
            wait_all(start_cli(cmd[3:], logs, num_processes=nproc, devices_per_process=1, cwd=ROOT,
                               env_extra={"HF_DATASETS_CACHE": str(tmp_path / "hf")}), logs, timeout=600)
        (r,) = json.loads(j.read_text())["results"]
        for spec in (LM_TASK, PROBE):
            got = r["lm_eval"]["metrics"][spec.split(":", 1)[1]]["acc"]
            assert got == pytest.approx(rec[split]["tasks"][spec], abs=1e-9), (spec, split)
        assert rec[split]["tasks"][PROBE] == pytest.approx(want_probe[split])
        (code,) = r["code"].values()
        assert code["metrics"]["pass@1"] == pytest.approx(rec[split]["tasks"][code_task]) == pytest.approx(want[split])
        assert code["executions_by_host"] == ([2, 2] if nproc == 2 else [6])


# ------------------------------------------------------------------------------------------ several processes


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_the_execution_split_runs_every_sample_once(processes):
    from ptm.eval.code_exec import execution_share

    problems, n = 5, 4  # sample j of problem i is execution i*n + j
    shares = [execution_share(problems * n, p, processes) for p in range(processes)]
    ran = sorted(divmod(k, n) for share in shares for k in share)
    assert ran == [(i, j) for i in range(problems) for j in range(n)]  # each (problem, sample) exactly once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(k % processes == p for p, share in enumerate(shares) for k in share)
    with pytest.raises(ConfigError, match="process 2 of 2"):
        execution_share(4, 2, 2)


@needs_lm_eval
@pytest.mark.slow  # one 2-process study (the 1-process one is the fixture above): ~60-90 s on 2 cores
def test_two_processes_score_lm_eval_and_code_tasks_as_one(extra_study):
    """The same study as one SPMD program of 2 processes x 1 device (the same 2-device global mesh): lm-eval runs
    on every process with the decoder on the global mesh, code executions split over the processes; scores,
    tables and CSV equal the 1-process run's."""
    S = extra_study
    two = S.base / "two"
    procs = start_cli(["experiment", str(S.toml), "--results-dir", str(two)], S.base / "two", num_processes=2,
                      devices_per_process=1, env_extra={"HF_DATASETS_CACHE": str(S.hf)}, cwd=ROOT)
    wait_all(procs, S.base / "two", timeout=900)
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (S.out, two))
    assert r2["models"] == r1["models"] and r2["tables"] == r1["tables"]
    for name in ("tables.md", "results.csv"):
        assert (two / name).read_text() == (S.out / name).read_text(), name
    for split in ("validation", "test"):
        ones = sorted((S.out / "scores" / split).glob("*.json"))
        assert ones and [f.name for f in ones] == sorted(f.name for f in (two / "scores" / split).glob("*.json"))
        for f in ones:
            a, b = json.loads(f.read_text()), json.loads((two / "scores" / split / f.name).read_text())
            for key in ("tasks", "n_items", "examples", "extra"):
                assert a[key] == b[key], (split, f.name, key)
            assert S.code_task in a["extra"] and LM_TASK in a["extra"]
    assert not S.hf.exists()  # no process touched the shared datasets cache
    # the sandbox runs were split: 2 problems x 2 samples on validation, 3 x 2 on test, half on each host
    log = (S.base / "two_0.txt").read_text()
    assert f"validation {S.code_task}: 4 executions, by host [2, 2]" in log, log[-3000:]
    assert f"test {S.code_task}: 6 executions, by host [3, 3]" in log, log[-3000:]
    assert "report:" in log and "report:" not in (S.base / "two_1.txt").read_text()  # only process 0 writes
