"""The eval-set file format: loading, validation errors naming file:line, suites, round trip."""

from __future__ import annotations

import json

import pytest

from ptm.errors import DataError
from ptm.eval.evalset import load_eval_file, load_suite, suite_files, write_eval_file

GOOD = {
    "task": "t",
    "messages": [{"role": "user", "content": "2+2?"}],
    "reference": "4",
    "scorer": "final_number",
}


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_load_suite_dir_and_defaults(suite_dir):
    files = suite_files(suite_dir)
    assert [f.name for f in files] == ["general.jsonl", "skills.jsonl"]
    items = load_suite(suite_dir)
    assert len(items) == 48
    assert {i.scorer for i in items} == {
        "multiple_choice",
        "final_number",
        "exact_match",
        "refusal",
        "program",
        "perplexity",
    }
    first = items[0]
    assert first.where.endswith("general.jsonl:1") and first.category == "general"
    # a list of files works too, in the order given
    assert len(load_suite([suite_dir / "skills.jsonl", suite_dir / "general.jsonl"])) == 48


@pytest.mark.parametrize(
    "bad,msg",
    [
        ("{not json", "malformed JSON"),
        ('["a list"]', "expected a JSON object"),
        ({**GOOD, "scorer": "bleu"}, "unknown scorer 'bleu'; known scorers: contains, exact_match"),
        ({k: v for k, v in GOOD.items() if k != "reference"}, "missing required field(s) reference"),
        ({**GOOD, "refrence": "x"}, "unknown field(s) refrence"),
        ({**GOOD, "messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
        ({**GOOD, "reference": "four"}, "final_number reference has no number"),
        ({**GOOD, "scorer": "refusal", "reference": "maybe"}, 'must be "refuse" or "comply"'),
        (
            {**GOOD, "scorer": "multiple_choice", "choices": ["3", "5"]},
            "reference must be one of the choices",
        ),
        ({**GOOD, "scorer": "multiple_choice"}, "needs 'choices'"),
        ({**GOOD, "choices": ["4", "5"]}, "only used by the multiple_choice scorer"),
        ({**GOOD, "scorer": "program"}, "meta.checker"),
        (
            {**GOOD, "scorer": "program", "meta": {"checker": "nope"}},
            "unknown checker 'nope'; known checkers:",
        ),
        ({**GOOD, "messages": []}, "no prompt"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, msg):
    f = write_lines(tmp_path / "set.jsonl", [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        load_eval_file(f)
    assert f"{f}:4: " in str(e.value)  # blank line 2 still counts
    assert msg in str(e.value)


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="no such eval file"):
        load_suite(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.jsonl"):
        load_suite(tmp_path / "empty")


def test_write_round_trip_and_refuses_bad_items(tmp_path):
    items = load_suite(write_lines(tmp_path / "a.jsonl", [GOOD, {**GOOD, "meta": {"source": "x"}, "id": 7}]))
    out = tmp_path / "sub" / "b.jsonl"
    assert write_eval_file(out, items) == 2
    again = load_eval_file(out)
    assert [i.to_json() for i in again] == [i.to_json() for i in items]
    assert again[1].id == "7" and again[1].meta == {"source": "x"}
    with pytest.raises(DataError, match="c.jsonl:2"):
        write_eval_file(tmp_path / "c.jsonl", [GOOD, {**GOOD, "scorer": "bleu"}])
    assert not (tmp_path / "c.jsonl").exists()


def test_gcs_suite(gcs_bucket, tmp_path):
    write_eval_file(f"{gcs_bucket}/evals/x.jsonl", [GOOD, GOOD])
    items = load_suite(f"{gcs_bucket}/evals")
    assert len(items) == 2 and items[1].where == f"{gcs_bucket}/evals/x.jsonl:2"
