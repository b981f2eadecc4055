"""Staging the paper's general benchmarks offline: lm-eval's own task YAMLs rewritten to read local JSONL
(`ptm evalset lm-eval-tasks`), the parquet -> JSONL converter with its validation carving (`ptm evalset
lm-eval-data`), and `ptm eval --lm-eval mmlu,bbh_cot_fewshot,gsm8k,truthfulqa_mc1` over both on fabricated data with
the hub switched off."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ptm.errors import ConfigError, DataError
from ptm.eval import benchmark_data as bd
from ptm.testing import benchmarks as fab

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'ptm[lm_eval]')")

from ptm.eval import lm_eval_model as L  # noqa: E402
from ptm.eval import lm_eval_stage as S  # noqa: E402

TASKS = ("mmlu", "bbh_cot_fewshot", "gsm8k", "truthfulqa_mc1", "truthfulqa_mc2")
OPT = bd.Options(gsm8k_validation=2, bbh_validation_fraction=0.4, truthfulqa_validation_fraction=0.25)
# fabricated rows per split -> the documents each split's tasks score
DOCS = {"mmlu": {"validation": 2, "test": 3}, "bbh": {"validation": 2, "test": 3},
        "gsm8k": {"validation": 2, "test": 3}, "truthfulqa": {"validation": 2, "test": 6}}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage") / "lm_eval"
    return out, S.write_task_yamls(out, TASKS)


def _subsets(manifest: dict, bench: str) -> list[str]:
    return sorted(Path(files["test"]).parent.name for files in manifest[bench].values())


@pytest.fixture(scope="module")
def data(tmp_path_factory, staged):
    _, manifest = staged
    root = tmp_path_factory.mktemp("downloads")
    src = fab.all_benchmarks(root, _subsets(manifest, "mmlu"), _subsets(manifest, "bbh_cot_fewshot"))
    out = root / "lm_eval_data"
    return out, bd.convert(src, out, OPT), src


def test_stage_writes_lm_evals_definitions_reading_local_files(staged):
    out, manifest = staged
    assert {b: len(v) for b, v in manifest.items()} == {"mmlu": 57, "bbh_cot_fewshot": 27, "gsm8k": 1,
                                                        "truthfulqa_mc1": 1, "truthfulqa_mc2": 2}
    src = S.lm_eval_tasks_dir()
    for leaf in ("mmlu/default/mmlu_astronomy.yaml", "bbh/cot_fewshot/word_sorting.yaml", "gsm8k/gsm8k.yaml",
                 "truthfulqa/truthfulqa_mc2.yaml"):
        mine, theirs = S.resolved(out / leaf), S.resolved(src / leaf)
        assert mine["dataset_path"] == "json" and mine["dataset_name"] is None
        files = mine["dataset_kwargs"]["data_files"]
        assert files[mine["validation_split"]] != files[mine["test_split"]]
        assert all(f.startswith("${PTM_LM_EVAL_DATA}/") for f in files.values())
        changed = {"dataset_path", "dataset_name", "dataset_kwargs", "validation_split", "test_split"}
        assert {k: v for k, v in mine.items() if k not in changed} == {k: v for k, v in theirs.items()
                                                                       if k not in changed}, leaf
    # templates, groups and the `!function` module travel along
    for f in ("mmlu/default/_default_template_yaml", "mmlu/default/_mmlu.yaml", "mmlu/default/_mmlu_stem.yaml",
              "bbh/cot_fewshot/_bbh_cot_fewshot.yaml", "truthfulqa/utils.py"):
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
    assert "!function" in (out / "truthfulqa/truthfulqa_mc2.yaml").read_text()
    assert json.loads((out / S.MANIFEST).read_text())["tasks"] == manifest


def test_stage_refuses_to_overwrite_and_force_replaces_whole(tmp_path):
    out = tmp_path / "t"
    S.write_task_yamls(out, ["gsm8k"])
    (out / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        S.write_task_yamls(out, ["truthfulqa_mc1"])
    assert (out / "gsm8k/gsm8k.yaml").exists()
    S.write_task_yamls(out, ["truthfulqa_mc1"], force=True)
    assert not (out / "gsm8k").exists() and (out / "truthfulqa/truthfulqa_mc1.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no staging leftovers
    with pytest.raises(ConfigError, match="expected some of"):
        S.write_task_yamls(tmp_path / "u", ["hellaswag"])
    assert not (tmp_path / "u").exists()


def test_converter_writes_the_documented_layout_and_carves_validation(data, tmp_path):
    out, counts, src = data
    assert len([f for f in counts["mmlu"] if f.endswith("/test.jsonl")]) == 57
    val = [json.loads(x) for x in (out / "gsm8k/validation.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (out / "gsm8k/train.jsonl").read_text().splitlines()]
    assert [r["answer"].split("#### ")[1] for r in train + val] == [str(i + 2) for i in range(8)]  # last 2 held out
    assert len(val) == 2
    tq = {s: (out / f"truthfulqa/{s}.jsonl").read_text().splitlines() for s in ("validation", "test")}
    assert (len(tq["validation"]), len(tq["test"])) == (2, 6) and not set(tq["validation"]) & set(tq["test"])
    assert json.loads(tq["test"][0])["mc1_targets"] == {"choices": ["Nothing happens.", "You die.", "You win."],
                                                       "labels": [1, 0, 0]}
    # deterministic: a second conversion (and the seed) give the same split; another seed another one
    again = bd.convert({"bbh": src["bbh"]}, tmp_path / "again", OPT)
    assert again["bbh"] == counts["bbh"]
    for f in counts["bbh"]:
        assert (tmp_path / "again" / f).read_bytes() == (out / f).read_bytes()
    other = bd.convert({"bbh": src["bbh"]}, tmp_path / "other", bd.Options(bbh_validation_fraction=0.4, seed=1))
    assert any((tmp_path / "other" / f).read_bytes() != (out / f).read_bytes() for f in other["bbh"])
    # MMLU's `all/` table alone splits by subject into the same files
    comb = fab.mmlu(tmp_path / "mmlu_all", ["astronomy", "virology"], combined=True)
    bd.convert({"mmlu": comb}, tmp_path / "c", OPT)
    for s in ("astronomy", "virology"):
        for sp in ("dev", "validation", "test"):
            assert (tmp_path / "c/mmlu" / s / f"{sp}.jsonl").read_bytes() == (out / "mmlu" / s / f"{sp}.jsonl"
                                                                               ).read_bytes()


def test_converter_bad_input_names_the_file_and_writes_nothing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = fab.gsm8k(tmp_path / "gsm")
    bad = fab.bbh(tmp_path / "bbh", ["navigate", "snarks"])
    f = bad / "snarks" / f"test{fab.SHARD}"
    pq.write_table(pa.table({"input": ["q"], "answer": ["a"]}), f)  # wrong column
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"{f}: no column\(s\) \['target'\]"):
        bd.convert({"gsm8k": good, "bbh": bad}, out, OPT)
    assert not out.exists() or not any(out.iterdir())  # not even the good benchmark
    pq.write_table(pa.table({"input": ["q", ""], "target": ["a", "b"]}), f)
    with pytest.raises(DataError, match=rf"{f}: row 1: 'input' must be a non-empty string"):
        bd.convert({"bbh": bad}, out, OPT)
    mc = fab.truthfulqa(tmp_path / "tq")
    tf = mc / "multiple_choice" / f"validation{fab.SHARD}"
    t = pq.read_table(tf).to_pylist()
    t[3]["mc1_targets"]["labels"] = [0, 1, 0]
    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(tf)), tf)
    with pytest.raises(DataError, match=rf"{tf}: row 3: 'mc1_targets': the first choice must be"):
        bd.convert({"truthfulqa": mc}, out, OPT)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weird.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="weird.parquet: cannot tell its split"):
        bd.convert({"gsm8k": tmp_path / "junk"}, out, OPT)
    with pytest.raises(DataError, match="not a directory"):
        bd.convert({"gsm8k": tmp_path / "nowhere"}, out, OPT)
    with pytest.raises(ConfigError, match="GSM8K validation size 500"):
        bd.convert({"gsm8k": good}, out, bd.Options())
    # an existing benchmark directory is kept unless force
    bd.convert({"gsm8k": good}, out, OPT)
    before = (out / "gsm8k/test.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        bd.convert({"gsm8k": fab.gsm8k(tmp_path / "gsm2", test=1)}, out, OPT)
    assert (out / "gsm8k/test.jsonl").read_bytes() == before
    bd.convert({"gsm8k": tmp_path / "gsm2"}, out, OPT, force=True)
    assert len((out / "gsm8k/test.jsonl").read_text().splitlines()) == 1


def test_built_in_names_resolve_to_the_staged_definitions_even_with_lm_evals_own_tasks(staged, data):
    """lm-eval indexes its built-ins first and include paths after them; a later path overrides, so `gsm8k` and
    `mmlu` are the staged ones even when the built-in tasks are indexed too (as with a built-in task requested)."""
    from lm_eval.tasks import TaskManager

    out, _ = staged
    src = S.lm_eval_tasks_dir()
    # What TaskManager(include_path=[out]) does, without indexing all ~15k built-in YAMLs (~15 s): the built-in
    # directory is simply the first path of the same list.
    tm = TaskManager(include_path=[str(src / "gsm8k"), str(src / "mmlu"), str(src / "bbh"), str(src / "truthfulqa"),
                                   str(out)], include_defaults=False)
    for name in ("gsm8k", "mmlu", "mmlu_astronomy", "mmlu_stem_tasks", "bbh_cot_fewshot", "truthfulqa_mc1"):
        entry = tm.task_index[name]
        assert entry.yaml_path is None or str(out) in str(entry.yaml_path), name
    assert sorted(tm.task_index["mmlu_stem_tasks"].tags) == sorted(
        t for t in tm.task_index if t.startswith("mmlu_") and "mmlu_stem_tasks" in tm.task_index[t].tags)
    assert str(src) in str(tm.task_index["gsm8k_cot"].yaml_path)  # lm-eval's other tasks are still there
    root, dirs = L.stage_task_dirs([out], str(data[0]))
    try:
        got = TaskManager(include_path=[str(src / "gsm8k"), *dirs], include_defaults=False).load(["gsm8k"])
        task = got["tasks"]["gsm8k"]
        assert task.config.dataset_path == "json" and len(task.dataset["validation"]) == 2
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_ptm_eval_runs_the_four_benchmarks_from_staged_files(staged, data, tmp_path, tiny_config, tiny_params):
    import orbax.checkpoint as ocp

    from ptm.ckpt import format as ckpt_format
    from ptm.cli import main

    out, _ = staged
    ckpt = tmp_path / "ckpt"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(ckpt / "params", tiny_params)
    ckptr.wait_until_finished()
    ckpt_format.write_meta(ckpt, ckpt_format.make_meta(tiny_config.to_dict(), step=1))
    res = {}
    for split in ("validation", "test"):
        j = tmp_path / f"{split}.json"
        args = ["eval", str(ckpt), "--lm-eval", ",".join(TASKS), "--lm-eval-include", str(out),
                "--lm-eval-data", str(data[0]), "--lm-eval-split", split, "--lm-eval-log-samples",
                "--lm-eval-gen-kwargs", "max_gen_toks=4", "--batch-size", "32", "--out", str(j), "--no-progress"]
        assert main(args) == 0
        (r,) = json.loads(j.read_text())["results"]
        res[split] = r["lm_eval"]
    for split, r in res.items():
        groups, results, samples = r["groups"], r["results"], r["samples"]
        assert set(groups) >= {"mmlu", "mmlu_stem", "mmlu_humanities", "bbh_cot_fewshot"}, split
        assert 0 <= groups["mmlu"]["acc,none"] <= 1
        assert "exact_match,get-answer" in groups["bbh_cot_fewshot"]
        assert "exact_match,strict-match" in results["gsm8k"] and "acc,none" in results["truthfulqa_mc1"]
        assert 0 <= results["truthfulqa_mc2"]["acc,none"] <= 1  # its !function utils.process_results_mc2 ran
        leaves = {t for t in results if t not in groups}
        assert len(leaves) == 57 + 27 + 3 and set(samples) == leaves
        for task, recs in samples.items():  # every subtask read its own split's staged file, and only that
            bench = "mmlu" if task.startswith("mmlu") else "bbh" if task.startswith("bbh") else task.split("_")[0]
            assert len({r["doc_id"] for r in recs}) == DOCS[bench][split], (task, split)  # (a record per filter)
    q = {r["doc"]["question"] for r in res["validation"]["samples"]["gsm8k"]}
    assert q.isdisjoint({r["doc"]["question"] for r in res["test"]["samples"]["gsm8k"]})
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_evalset_commands(tmp_path, capsys):
    from ptm.cli import main

    src = fab.gsm8k(tmp_path / "dl/gsm8k")
    tq = fab.truthfulqa(tmp_path / "dl/tq")
    out = tmp_path / "data"
    assert main(["evalset", "lm-eval-data", "--gsm8k", str(src), "--truthfulqa", str(tq), "--out", str(out),
                 "--gsm8k-validation", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}/gsm8k: 3 files; train 6, validation 2, test 3" in printed
    assert f"{out}/truthfulqa: 2 files; validation 2, test 6" in printed
    assert main(["evalset", "lm-eval-data", "--gsm8k", str(src), "--out", str(out)]) == 2  # exists, no --force
    assert "already exists (use --force" in capsys.readouterr().err
    assert main(["evalset", "lm-eval-data", "--out", str(out)]) == 2
    assert "nothing to convert" in capsys.readouterr().err
    (src / "main" / f"test{fab.SHARD}").write_bytes(b"PAR1 broken")
    assert main(["evalset", "lm-eval-data", "--gsm8k", str(src), "--out", str(tmp_path / "d2")]) == 2
    assert f"{src}/main/test{fab.SHARD}: cannot read parquet" in capsys.readouterr().err
    assert not (tmp_path / "d2").exists() or not any((tmp_path / "d2").iterdir())
    yamls = tmp_path / "tasks"
    assert main(["evalset", "lm-eval-tasks", "--out", str(yamls), "--tasks", "gsm8k,truthfulqa_mc1"]) == 0
    assert "gsm8k: 1 task(s)" in capsys.readouterr().out
    assert main(["evalset", "lm-eval-tasks", "--out", str(yamls), "--tasks", "gsm8k"]) == 2
    assert main(["evalset", "lm-eval-tasks", "--out", str(yamls), "--tasks", "gsm8k", "--force"]) == 0
    assert main(["evalset", "lm-eval-tasks", "--out", str(tmp_path / "x"), "--tasks", "arc"]) == 2
    assert "expected some of" in capsys.readouterr().err


def test_a_task_yaml_included_by_another_is_staged_too(tmp_path):
    """truthfulqa_mc2.yaml includes truthfulqa_mc1.yaml: staging mc2 alone must not leave a copied mc1 that reads
    the hub."""
    man = S.write_task_yamls(tmp_path / "t", ["truthfulqa_mc2"])
    assert sorted(man["truthfulqa_mc2"]) == ["truthfulqa_mc1", "truthfulqa_mc2"]
    for f in ("truthfulqa_mc1.yaml", "truthfulqa_mc2.yaml"):
        assert S.resolved(tmp_path / "t/truthfulqa" / f)["dataset_path"] == "json", f


def test_a_task_whose_few_shot_split_is_validation_is_refused(tmp_path):
    src = tmp_path / "tasks" / "gsm8k"
    src.mkdir(parents=True)
    (src / "gsm8k.yaml").write_text("task: gsm8k\ndataset_path: x/y\nfewshot_split: validation\ntest_split: test\n"
                                    "output_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n")
    with pytest.raises(ConfigError, match=r"gsm8k.yaml: \{'fewshot_split': 'validation'\} names a split"):
        S.write_task_yamls(tmp_path / "out", ["gsm8k"], tasks_dir=tmp_path / "tasks")
    assert not (tmp_path / "out").exists()
