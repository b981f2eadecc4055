"""`ptm experiment` on seqio data: every data, tokenizer and eval entry a registered Task/Mixture (`[seqio]`),
trained through ptm's planner so D_i subsets, RT's G + D_i and the costs are counted exactly as for JSONL."""

from __future__ import annotations

import json
import textwrap

import pytest

pytest.importorskip("seqio", reason="the optional `seqio` extra is not installed (pip install -e .[seqio])")

import seqio_tasks  # noqa: E402, F401  (registers the test Tasks)

from ptm.errors import ConfigError  # noqa: E402
from ptm.experiment import costs as C  # noqa: E402
from ptm.experiment.config import load  # noqa: E402
from ptm.experiment.runner import Experiment  # noqa: E402

STUDY = """
name = "seqio_micro"
tokenizer = "seqio:ptm_lm"          # the Tasks' SentencePieceVocabulary
compilation_cache = false

[seqio]
modules = ["seqio_tasks"]
split = "train"

[base]
pretrain = true
data = "seqio:ptm_lm"               # targets-only LM Task

[general]
data = "seqio:ptm_prefix"           # prefix-LM Task: G
examples = 32

[skills.mix]
data = "seqio:{skill}"              # a Mixture (3:1)
examples = 24
sizes = [12]
tasks = ["ptm_qa2"]

[eval]
validation = "seqio:ptm_evals:validation"   # a Mixture of eval Tasks: ptm_qa (general) and ptm_qa2 (skill)
test = "seqio:ptm_evals:validation"
general_tasks = ["ptm_qa"]
max_items_per_task = 2
max_new_tokens = 4
batch_size = 8

[merge]
omegas = [1.0]
methods = ["task_arithmetic"]
multi_skill = false
pairwise = false

[model]
preset = "toy_micro"
vocab_size = 320

[train]
seq_len = 128
global_batch_size = 64
save_every = 10
epochs = 1
learning_rate = 3e-3
warmup_ratio = 0.0
"""


def _write(tmp_path, skill="ptm_mix"):
    p = tmp_path / "study.toml"
    p.write_text(textwrap.dedent(STUDY.replace("{skill}", skill)))
    return str(p)


@pytest.mark.slow  # a whole (tiny) study in this process: ~60-90 s on 2 shared cores
def test_study_on_seqio_tasks_counts_costs_like_jsonl(tmp_path):
    cfg = load(_write(tmp_path), str(tmp_path / "out"))
    res = Experiment(cfg, log=lambda s: None).run()
    runs = {k: C.RunCost(**v) for k, v in res["runs"].items()}
    assert runs["pre"].examples == 120  # every example of ptm_lm's train split
    assert runs["general"].examples == 32 and runs["skill_mix"].examples == 24
    assert runs["cft_mix_12"].examples == 12 and runs["rt_mix_12"].examples == 32 + 12
    f = res["formula_examples"]["mix"]
    assert f["cft"] == 12 and f["rt"] == 44 and f["ptm"] == 24
    assert res["heuristic_omegas"]["mix"] == pytest.approx(24 / 32)
    val = res["models"]["general"]["validation"]
    assert val is not None and set(val["skills"]) == {"mix"}
    spec = json.loads((tmp_path / "out" / "runs" / "rt_mix_12" / "experiment_run.json").read_text())
    assert [s["path"] for s in spec["sources"]] == ["seqio:ptm_prefix", "seqio:ptm_mix"]
    assert spec["seqio"] == {"modules": ["seqio_tasks"], "split": "train", "use_cached": False}
    meta = json.loads((tmp_path / "out" / "runs" / "skill_mix" / "run.json").read_text())
    assert meta["tokenizer"] == "seqio:ptm_lm"


def test_unknown_seqio_task_fails_before_training(tmp_path):
    cfg = load(_write(tmp_path, skill="ptm_mixx"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"no Task or Mixture named 'ptm_mixx'.*closest: ptm_mix"):
        Experiment(cfg, log=lambda s: None).run()
    assert not (tmp_path / "out" / "runs").exists()


def test_seqio_table_is_parsed_strictly(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(textwrap.dedent(STUDY.replace("{skill}", "ptm_mix")).replace('split = "train"', 'splits = "x"'))
    with pytest.raises(ConfigError, match=r"seqio.splits: unknown key"):
        load(str(p))
