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


def test_non_utf8_byte_on_a_late_line_names_file_and_line(tmp_path):
    """Issue 12, item 12: the line of the bad byte (1-based), not its offset in the whole file."""
    lines = [json.dumps({**GOOD, "id": i}).encode() for i in range(5000)]
    lines[4000] = lines[4000].replace(b"2+2?", b"2+2\xff?")
    f = tmp_path / "big.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"^{f}:4001: not UTF-8 text: byte 0xff at byte "):
        load_eval_file(f)
    with pytest.raises(DataError, match=rf"{f}:4001: not UTF-8"):
        load_suite(tmp_path)


def test_line_separator_inside_a_string_round_trips(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028/U+2029 raw inside strings; they are not line breaks."""
    f = tmp_path / "ls.jsonl"
    items = [{**GOOD, "reference": "4\u2028four"}, {**GOOD, "messages": [{"role": "user", "content": "a\u2029b"}]}]
    assert write_eval_file(f, items) == 2
    again = load_eval_file(f)
    assert again[0].reference == "4\u2028four" and again[1].messages[0]["content"] == "a\u2029b"
    assert len(again) == 2 and again[1].where == f"{f}:2"
