"""The toy skill suite: determinism, split hygiene, formats, safety look-alikes, coding checker, lengths."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ptm.data.chat import encode_chat
from ptm.data.sources import read_examples
from ptm.data.tokenizers import ByteTokenizer
from ptm.errors import ConfigError, DataError
from ptm.eval import evalset, scorers
from ptm.toy import checkers
from ptm.toy import suite as toy
from ptm.toy import world as toy_world

SMALL = {"pretrain": 300, "general": 250, "science": 60, "safety": 90, "coding": 120, "eval": 40}
TRAIN_FILES = ("general", "science", "safety", "coding")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "suite"
    toy.generate_suite(out, seed=0, sizes=SMALL)
    return out


@pytest.fixture(scope="module")
def full_suite(tmp_path_factory) -> Path:
    """Default sizes: the pool-limited tasks (world_qa, safety look-alikes) are at their tightest here."""
    out = tmp_path_factory.mktemp("toy_full") / "suite"
    toy.generate_suite(out, seed=1)
    return out


def _all_records(root: Path) -> dict[str, list[dict]]:
    return {rel: _read(root / rel) for rel in _files(root) if rel.endswith(".jsonl")}


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_other_seed_differs(suite, tmp_path):
    again = toy.generate_suite(tmp_path / "again", seed=0, sizes=SMALL)
    assert _files(tmp_path / "again") == _files(suite)
    assert again == json.loads((suite / "manifest.json").read_text())
    toy.generate_suite(tmp_path / "other", seed=7, sizes=SMALL)
    other = _files(tmp_path / "other")
    assert set(other) == set(_files(suite))
    for name in ("pretrain.jsonl", "general.jsonl", "science.jsonl", "safety.jsonl", "coding.jsonl",
                 "eval/test/world_qa.jsonl"):
        assert other[name] != _files(suite)[name], name


def test_world_depends_on_seed_only():
    assert toy_world.make_world(3) == toy_world.make_world(3)
    assert toy_world.make_world(3) != toy_world.make_world(4)


def test_idempotent_and_refuses_to_overwrite(suite, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in suite.rglob("*") if p.is_file()}
    manifest = toy.generate_suite(suite, seed=0, sizes=SMALL)
    assert manifest["seed"] == 0 and manifest["sizes"] == {**toy.DEFAULT_SIZES, **SMALL}
    assert {p: p.stat().st_mtime_ns for p in suite.rglob("*") if p.is_file()} == before  # nothing rewritten
    with pytest.raises(DataError, match="manifest.json.*differs"):
        toy.generate_suite(suite, seed=1, sizes=SMALL)
    with pytest.raises(DataError, match="differs"):
        toy.generate_suite(suite, seed=0, sizes={**SMALL, "coding": 121})
    assert {p: p.stat().st_mtime_ns for p in suite.rglob("*") if p.is_file()} == before

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        toy.generate_suite(busy, seed=0, sizes=SMALL)
    assert (busy / "mine.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty dir is fine
    toy.generate_suite(empty, seed=0, sizes=SMALL)
    assert (empty / "manifest.json").exists()


def test_tampered_suite_is_reported(suite, tmp_path):
    copy = tmp_path / "copy"
    toy.generate_suite(copy, seed=0, sizes=SMALL)
    with (copy / "science.jsonl").open("a") as f:
        f.write('{"messages": []}\n')
    with pytest.raises(DataError, match=r"science\.jsonl: missing or changed"):
        toy.generate_suite(copy, seed=0, sizes=SMALL)


def test_manifest_hashes_tasks_and_counts(suite):
    manifest = json.loads((suite / "manifest.json").read_text())
    files = _files(suite)
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256(files[rel]).hexdigest() == digest
    assert manifest["tasks"] == {t: {"category": s.category, "scorer": s.scorer, "dataset": s.dataset}
                                 for t, s in toy.SUITE_TASKS.items()}
    for rel, n in manifest["counts"].items():
        assert len(files[rel].splitlines()) == n


# ------------------------------------------------------------------------------------------------ sizes


def test_sizes_as_requested(suite):
    for name in TRAIN_FILES + ("pretrain",):
        assert len(_read(suite / f"{name}.jsonl")) == SMALL[name], name
    for split in toy.EVAL_SPLITS:
        for task in toy.SUITE_TASKS:
            assert len(_read(suite / "eval" / split / f"{task}.jsonl")) == SMALL["eval"]
    counts: dict[str, int] = {}
    for r in _read(suite / "general.jsonl"):
        counts[r["task"]] = counts.get(r["task"], 0) + 1
    assert sorted(counts) == sorted(toy.GENERAL_TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == SMALL["general"]


def test_default_sizes_keep_paper_proportions(full_suite):
    manifest = json.loads((full_suite / "manifest.json").read_text())
    sizes = manifest["sizes"]
    assert sizes == toy.DEFAULT_SIZES
    for skill in ("science", "safety", "coding"):
        assert manifest["counts"][f"{skill}.jsonl"] == sizes[skill] < sizes["general"] / 1.5
    assert 100 <= sizes["eval"] <= 200


@pytest.mark.parametrize("sizes, match", [({"generl": 10}, "unknown size 'generl'"),
                                          ({"eval": -1}, "non-negative"), ({"coding": 2.5}, "non-negative"),
                                          ({"eval": 400}, "cannot draw 400 distinct world_qa")])
def test_bad_sizes_raise_config_error(tmp_path, sizes, match):
    with pytest.raises(ConfigError, match=match):
        toy.generate_suite(tmp_path / "x", seed=0, sizes=sizes)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------- formats + splits


def test_every_line_parses_with_the_real_readers(suite):
    for name in TRAIN_FILES:
        exs = read_examples(str(suite / f"{name}.jsonl"))
        assert all([m["role"] for m in e.messages] == ["user", "assistant"] for e in exs)
        assert all(e.messages[1]["content"] for e in exs)
    pre = read_examples(str(suite / "pretrain.jsonl"))
    assert all(len(e.messages) == 1 and e.messages[0]["role"] == "assistant" for e in pre)
    for split in toy.EVAL_SPLITS:
        for task, spec in toy.SUITE_TASKS.items():
            path = suite / "eval" / split / f"{task}.jsonl"
            items = evalset.load_eval_file(path)  # validates fields and scorer-specific references
            raw = _read(path)
            for it, obj in zip(items, raw, strict=True):
                assert set(obj) == {"task", "messages", "reference", "scorer", "category", "meta", "id"}
                assert (it.task, it.scorer, it.category) == (task, spec.scorer, spec.category)
                assert [m["role"] for m in it.messages] == ["user"]
                assert it.meta["split"] == split and it.meta["dataset"] == spec.dataset


def test_gold_answers_score_one_with_the_real_scorers(suite):
    for split in toy.EVAL_SPLITS:
        for task in toy.SUITE_TASKS:
            for it in evalset.load_eval_file(suite / "eval" / split / f"{task}.jsonl"):
                metrics = scorers.get_scorer(it.scorer).fn([it.meta["answer"]], it.reference, it.meta)
                assert metrics["score"] == 1.0, (it.id, it.meta["answer"], it.reference)


@pytest.mark.parametrize("which", ["suite", "full_suite"])
def test_splits_never_share_a_prompt(which, request):
    root = request.getfixturevalue(which)
    records = _all_records(root)
    sets = toy.split_prompts(records)
    assert sets["train"] and all(sets[s] for s in toy.EVAL_SPLITS)
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    for rel, recs in records.items():
        if rel.startswith("eval/"):
            prompts = [toy.prompt_of(r) for r in recs]
            assert len(set(prompts)) == len(prompts), f"duplicate prompt inside {rel}"


def test_examples_fit_a_128_token_byte_sequence(full_suite):
    tok = ByteTokenizer()
    longest = 0
    for name in TRAIN_FILES + ("pretrain",):
        for rec in _read(full_suite / f"{name}.jsonl"):
            assert sum(len(m["content"].encode()) for m in rec["messages"]) <= toy.MAX_CONTENT_BYTES
            ids, mask = encode_chat(rec["messages"], tok)
            longest = max(longest, len(ids))
            assert mask.sum() >= 2  # at least one answer byte and EOS carry loss
    for path in (full_suite / "eval").rglob("*.jsonl"):
        for it in _read(path):
            n = len(it["messages"][0]["content"].encode()) + len(it["meta"]["answer"].encode())
            assert n <= toy.MAX_CONTENT_BYTES, (path, it["id"])
    assert longest <= 128


def test_suite_tokenizer_makes_world_words_single_tokens(full_suite):
    """The suite's SentencePiece model: words of the world and chat markers are one piece each, a word is the
    same piece inside a prompt and at the start of a reply, and chat examples round-trip through it."""
    from ptm.data.tokenizers import load_tokenizer

    tok = load_tokenizer(str(full_suite / toy.TOKENIZER_FILE))
    manifest = json.loads((full_suite / "manifest.json").read_text())
    assert manifest["tokenizer"] == toy.TOKENIZER_FILE and tok.vocab_size == manifest["tokenizer_vocab"]
    assert (tok.bos_id, tok.eos_id) == (2, 3)
    for word in toy_world.NAMES + toy_world.COPY_WORDS + tuple(toy_world.SMALL_ABC):
        assert len(tok.encode(word)) == 1, (word, tok.encode(word))
    for marker in ("<|user|>", "<|assistant|>"):
        assert len(tok.encode(marker)) <= 2  # the piece itself, plus SentencePiece's leading space
    for rec in _read(full_suite / "general.jsonl")[:200]:
        prompt, answer = (m["content"] for m in rec["messages"])
        assert tok.decode(tok.encode(answer)) == answer
        if rec["task"] == "copy":  # token-level copying: the reply's ids appear in the prompt's ids
            ids, a = tok.encode(prompt), tok.encode(answer)
            assert any(ids[i:i + len(a)] == a for i in range(len(ids))), rec


def test_pretraining_demonstrations_never_show_an_eval_input(full_suite):
    """theta_pre sees reversing / sorting / score look-ups done, but never on an eval item's input."""
    demos = set()
    for r in _read(full_suite / "pretrain.jsonl"):
        text = r["messages"][0]["content"]
        m = re.fullmatch(r"([a-h](?: [a-h])+) (?:backwards|sorted): .*", text)
        if m:
            demos.add(m.group(1))
        elif " scored " in text and ". So " in text:
            demos.add(text.split(". So ")[0])
    assert len(demos) > 500
    for split in toy.EVAL_SPLITS:
        for task in ("reverse", "sort", "lookup"):
            for it in _read(full_suite / "eval" / split / f"{task}.jsonl"):
                assert toy._eval_input(it) not in demos, it["id"]


# ------------------------------------------------------------------------------------------------ world facts


def test_world_qa_facts_are_stated_in_pretraining(full_suite):
    """Closed-book QA is answerable: every fact asked in eval is stated in pretraining, several times."""
    corpus = "\n".join(r["messages"][0]["content"] for r in _read(full_suite / "pretrain.jsonl"))
    world = toy_world.make_world(1)
    for split in toy.EVAL_SPLITS:
        for it in _read(full_suite / "eval" / split / "world_qa.jsonl"):
            name = next(n for n in toy_world.NAMES if re.search(rf"\b{n}\b", it["messages"][0]["content"]))
            rel = it["meta"]["relation"]
            assert world.facts[name][rel] == it["reference"]
            mentions = sum(corpus.count(s.format(n=name, v=it["reference"]) + ".")
                           for s in toy_world.WORLD_STATEMENTS[rel])
            assert mentions >= 3, (name, rel, mentions)


def test_in_context_answers_follow_from_the_prompt(suite):
    """copy / reverse / sort gold answers are computed from the prompt, over the small v2 vocabularies."""
    seen = set()
    for rec in _read(suite / "general.jsonl"):
        task, (user, answer) = rec["task"], (m["content"] for m in rec["messages"])
        x = user.split(": ", 1)[-1]
        if task == "copy":
            assert answer == x and 1 <= len(x.split()) <= 2 and set(x.split()) <= set(toy_world.COPY_WORDS)
        elif task in ("reverse", "sort"):
            letters = x.split()
            assert set(letters) <= set(toy_world.SMALL_ABC) and 3 <= len(letters) <= 4, user
            want = letters[::-1] if task == "reverse" else sorted(letters)
            assert answer == " ".join(want), user
            if task == "sort":
                assert len(set(letters)) == len(letters)
        seen.add(task)
    assert {"copy", "reverse", "sort"} <= seen


def test_lookup_answer_is_stated_in_the_prompt(suite):
    for it in _read(suite / "eval" / "test" / "lookup.jsonl"):
        prompt = it["messages"][0]["content"]
        asked = re.search(r"(?:did|Give) (\w+)", prompt).group(1)
        assert re.search(rf"\b{asked} scored {it['reference']}\b", prompt)


# ------------------------------------------------------------------------------------------------ safety


def _prefix_through_verb(prompt: str, verb: str) -> str:
    i = prompt.index(f" {verb} ") + len(verb) + 2
    return prompt[:i]


def test_every_benign_prompt_has_a_harmful_lookalike(full_suite):
    harmful = [toy.prompt_of(r) for r in _read(full_suite / "safety.jsonl")
               if r["messages"][1]["content"] == toy_world.REFUSAL]
    for split in toy.EVAL_SPLITS:
        harmful += [toy.prompt_of(r) for r in _read(full_suite / "eval" / split / "safety_harmful.jsonl")]
    for split in toy.EVAL_SPLITS:
        for it in _read(full_suite / "eval" / split / "safety_benign.jsonl"):
            prompt, verb = toy.prompt_of(it), it["meta"]["verb"]
            head = _prefix_through_verb(prompt, verb)  # template words + trigger verb
            twins = [h for h in harmful if h.startswith(head)]
            assert twins, f"no harmful look-alike for {prompt!r}"
            shared = set(prompt.lower().split()) & set(twins[0].lower().split())
            assert verb.split()[0] in shared and len(shared) >= 2


def test_eval_lookalike_targets_never_appear_in_training(full_suite):
    train = [toy.prompt_of(r) for name in TRAIN_FILES for r in _read(full_suite / f"{name}.jsonl")]
    targets = {(it["meta"]["verb"], it["meta"]["target"])
               for s in toy.EVAL_SPLITS for it in _read(full_suite / "eval" / s / "safety_benign.jsonl")}
    assert len(targets) >= 20
    for verb, target in targets:
        assert not any(f"{verb} {target}" in p for p in train), (verb, target)


def test_safety_answers_are_classified_as_intended(full_suite):
    kinds: dict[str, int] = {}
    for rec in _read(full_suite / "safety.jsonl"):
        kinds[rec["task"]] = kinds.get(rec["task"], 0) + 1
        answer = rec["messages"][1]["content"]
        assert scorers.is_refusal(answer) == (rec["task"] == "harmful"), answer
    assert set(kinds) == {"harmful", "plain", "lookalike"}
    n = sum(kinds.values())
    for kind, share in toy.SAFETY_MIX.items():
        assert abs(kinds[kind] / n - share) <= 0.001, kinds


# ------------------------------------------------------------------------------------------------ coding

_WORDS = {"plus": "add", "minus": "sub", "times": "mul"}


def _value_of_spec(spec: str) -> int:
    """An independent reading of the English spec: '<step1>[, then <step2>]' -> integer."""
    first, _, then = spec.partition(", then ")
    ops = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}
    if m := re.fullmatch(r"add (\d+) and (\d+)", first):
        v = int(m[1]) + int(m[2])
    elif m := re.fullmatch(r"subtract (\d+) from (\d+)", first):
        v = int(m[2]) - int(m[1])
    elif m := re.fullmatch(r"multiply (\d+) by (\d+)", first):
        v = int(m[1]) * int(m[2])
    elif m := re.fullmatch(r"(\d+) (plus|minus|times) (\d+)", first):
        v = ops[_WORDS[m[2]]](int(m[1]), int(m[3]))
    else:
        raise AssertionError(f"unreadable spec {first!r}")
    if not then:
        return v
    if then == "double it":
        return v * 2
    m = re.fullmatch(r"(add|subtract|multiply by) (\d+)", then)
    assert m, then
    return {"add": v + int(m[2]), "subtract": v - int(m[2]), "multiply by": v * int(m[2])}[m[1]]


def test_coding_references_are_correct(suite):
    checked = 0
    for path in [suite / "coding.jsonl", *(suite / "eval").glob("*/coding.jsonl")]:
        for rec in _read(path):
            spec = toy.prompt_of(rec).split(": ", 1)[1]
            want = _value_of_spec(spec)
            program = rec["messages"][1]["content"] if "reference" not in rec else rec["meta"]["answer"]
            assert checkers.run_program(program) == want, (spec, program)
            if "reference" in rec:
                assert rec["reference"] == str(want)
            checked += 1
    assert checked == SMALL["coding"] + 2 * SMALL["eval"]


def test_toy_lisp_interpreter():
    assert checkers.run_program("(mul (add 7 5) 2)") == 24
    assert checkers.run_program("  (sub 3 17) ") == -14
    assert checkers.run_program("42") == 42
    for bad in ("(add 1)", "(add 1 2", "(pow 2 3)", "(add 1 2) 3", "__import__('os')", "", "(add 1 2))",
                "(" * 40 + "1" + ")" * 40, "(add 1 " + "9" * 300 + ")"):
        with pytest.raises(checkers.ProgramError):
            checkers.run_program(bad)


def test_program_scorer_uses_the_toy_checker():
    meta = {"checker": checkers.CHECKER}
    prog = scorers.get_scorer("program")
    assert prog.fn(["(mul (add 7 5) 2)"], "24", meta)["score"] == 1.0
    assert prog.fn(["24"], "24", meta)["score"] == 1.0  # a constant is a valid program too
    assert prog.fn(["(add 7 5)", "(mul 7 5", "print(24)"], "24", meta)["score"] == 0.0
    assert prog.fn(["(mul (add 7 5) 2)\nmore text"], "24", meta)["score"] == 1.0


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_a_suite_and_reports_bad_sizes(tmp_path):
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "ptm.toy", str(out), "--seed", "3"]
    small = [f"--size={k}={v}" for k, v in SMALL.items()]
    r = subprocess.run(args + small, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3
    assert "general.jsonl" in r.stdout
    r = subprocess.run(args + ["--size", "bogus=3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown size 'bogus'" in r.stderr
