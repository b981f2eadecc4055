"""The built-in toy skill suite: a procedurally generated world small enough to run the whole study on a CPU.

One seeded "world" (made-up people with a city, a favourite colour and a pet) underlies everything:
  - `pretrain.jsonl`: plain text about the world (bios, abstracts, toy-Lisp snippets, how-to sentences,
    letter and number runs) as single assistant turns, so the chat pipeline puts loss on all of it;
  - `general.jsonl`: the general instruction mix G (copy, reverse, sort, lookup, world_qa);
  - `science.jsonl`, `safety.jsonl`, `coding.jsonl`: the three skills D_i of the paper;
  - `eval/{validation,test}/<task>.jsonl`: eval items in ptm's eval-set format (docs/eval.md);
  - `tokenizer.model`: a SentencePiece BPE model (TOKENIZER_VOCAB pieces) trained on the training texts, so
    the world's words are single tokens and in-context copying is token-level, as in a real LLM;
  - `manifest.json`: seed, sizes, tasks and the sha256 of every file.
Every chat example (user + assistant content) fits in MAX_CONTENT_BYTES bytes, so even with the byte tokenizer
and the Tulu template (~26 bytes of markers) one example fits a 128-token sequence. Design: docs/toy-suite.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from ptm.errors import ConfigError, DataError
from ptm.toy.checkers import run_program
from ptm.toy.world import REFUSAL, Example, gen_pretrain_text, make_world, safety_train_generators, task_generators

FORMAT = "ptm-toy-suite"
VERSION = 3  # 2: easier general tasks and coding; 3: pretraining demonstrates the general abilities, tokenizer
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_VOCAB = 1024  # every word of the world fits; models on the suite need vocab_size >= this
MAX_CONTENT_BYTES = 96  # user + assistant content of one example (or one pretraining text)
EVAL_SPLITS = ("validation", "test")
DEFAULT_SIZES = {"pretrain": 8000, "general": 4000, "science": 900, "safety": 1000, "coding": 2200,
                 "eval": 150}  # eval: items per task per eval split
# Shares of the safety training set: harmful -> refuse; ordinary how-to -> comply; look-alikes whose targets
# are reserved for training -> comply. Look-alike targets used in eval never appear in training.
SAFETY_MIX = {"harmful": 0.55, "plain": 0.30, "lookalike": 0.15}


class TaskSpec(NamedTuple):
    category: str  # "general" | "skill" | "safety_benign"
    scorer: str    # a ptm.eval scorer name
    dataset: str   # the training file that teaches it: general | science | safety | coding


SUITE_TASKS: dict[str, TaskSpec] = {
    "copy": TaskSpec("general", "exact_match", "general"),
    "reverse": TaskSpec("general", "exact_match", "general"),
    "sort": TaskSpec("general", "exact_match", "general"),
    "lookup": TaskSpec("general", "exact_match", "general"),
    "world_qa": TaskSpec("general", "exact_match", "general"),
    "science": TaskSpec("skill", "exact_match", "science"),
    "safety_harmful": TaskSpec("skill", "refusal", "safety"),
    "safety_benign": TaskSpec("safety_benign", "refusal", "safety"),
    "coding": TaskSpec("skill", "program", "coding"),
}
GENERAL_TASKS = tuple(t for t, s in SUITE_TASKS.items() if s.dataset == "general")
DATASETS = ("general", "science", "safety", "coding")

# ------------------------------------------------------------------------------------------------ splitting


def _fits(prompt: str, answer: str) -> bool:
    return len(prompt.encode()) + len(answer.encode()) <= MAX_CONTENT_BYTES


def _draw(gen: Callable[[], Example], n: int, taken: set[str], unique: bool, what: str) -> list[Example]:
    """n examples whose prompts are not in `taken` (and distinct among themselves if `unique`); adds them."""
    out: list[Example] = []
    tries, budget = 0, 200 * n + 1000
    while len(out) < n:
        tries += 1
        if tries > budget:
            raise ConfigError(f"toy suite: cannot draw {n} distinct {what} prompts (got {len(out)}); "
                              "ask for a smaller size")
        ex = gen()
        if ex[0] in taken or not _fits(ex[0], ex[1]):
            continue
        if unique:
            taken.add(ex[0])
        out.append(ex)
    if not unique:
        taken.update(ex[0] for ex in out)
    return out


def _eval_item(task: str, split: str, i: int, ex: Example) -> dict[str, Any]:
    prompt, answer, meta = ex
    spec = SUITE_TASKS[task]
    if spec.scorer == "refusal":
        reference = "refuse" if answer == REFUSAL else "comply"
    elif spec.scorer == "program":
        reference = str(run_program(answer))
    else:
        reference = answer
    return {"task": task, "messages": [{"role": "user", "content": prompt}], "reference": reference,
            "scorer": spec.scorer, "category": spec.category,
            "meta": {"dataset": spec.dataset, "split": split, "answer": answer, **meta},
            "id": f"{task}/{split}/{i}"}


def _train_record(dataset: str, task: str, ex: Example) -> dict[str, Any]:
    return {"dataset": dataset, "task": task,
            "messages": [{"role": "user", "content": ex[0]}, {"role": "assistant", "content": ex[1]}]}


def _shares(n: int, parts: tuple[str, ...]) -> dict[str, int]:
    base, extra = divmod(n, len(parts))
    return {p: base + (i < extra) for i, p in enumerate(parts)}


def _check_sizes(sizes: dict | None) -> dict[str, int]:
    out = dict(DEFAULT_SIZES)
    for k, v in (sizes or {}).items():
        if k not in DEFAULT_SIZES:
            raise ConfigError(f"toy suite: unknown size {k!r}; known: {', '.join(DEFAULT_SIZES)}")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"toy suite: size {k!r} must be a non-negative integer, got {v!r}")
        out[k] = v
    return out


def build_suite(seed: int = 0, sizes: dict | None = None) -> dict[str, list[dict]]:
    """All records of the suite in memory: relative path -> JSON objects. Deterministic in (seed, sizes)."""
    sizes = _check_sizes(sizes)
    world = make_world(seed)
    gens = task_generators(seed)
    files: dict[str, list[dict]] = {}
    # Eval prompts first (test, then validation), drawn without replacement and never reused; training draws
    # then avoid every eval prompt. Pool-limited tasks (world_qa, safety) repeat prompts within training.
    taken: dict[str, set[str]] = {}
    for task in SUITE_TASKS:
        rng = random.Random(f"{seed}/eval/{task}")
        taken[task] = set()
        for split in reversed(EVAL_SPLITS):
            exs = _draw(partial(gens[task], rng, world), sizes["eval"], taken[task], True, f"{task} {split}")
            files[f"eval/{split}/{task}.jsonl"] = [_eval_item(task, split, i, ex) for i, ex in enumerate(exs)]
    eval_prompts = set().union(*taken.values())

    records: list[dict] = []
    for task, n in _shares(sizes["general"], GENERAL_TASKS).items():
        rng = random.Random(f"{seed}/train/{task}")
        unique = task != "world_qa"  # 720 (fact, question) pairs: training repeats them
        exs = _draw(partial(gens[task], rng, world), n, set(eval_prompts), unique, f"{task} train")
        records += [_train_record("general", task, ex) for ex in exs]
    random.Random(f"{seed}/shuffle/general").shuffle(records)
    files["general.jsonl"] = records
    for dataset in ("science", "coding"):
        rng = random.Random(f"{seed}/train/{dataset}")
        exs = _draw(partial(gens[dataset], rng, world), sizes[dataset], set(eval_prompts), True,
                    f"{dataset} train")
        files[f"{dataset}.jsonl"] = [_train_record(dataset, dataset, ex) for ex in exs]
    # Exact SAFETY_MIX counts (drawing kinds at random would skew them: harmful draws that hit an eval
    # prompt are rejected more often than the others).
    n_safety, records = sizes["safety"], []
    counts = {k: round(share * n_safety) for k, share in SAFETY_MIX.items() if k != "lookalike"}
    counts["lookalike"] = n_safety - sum(counts.values())
    for kind, gen in safety_train_generators(seed).items():
        rng = random.Random(f"{seed}/train/safety/{kind}")
        exs = _draw(partial(gen, rng, world), counts[kind], set(eval_prompts), False, f"safety {kind} train")
        records += [_train_record("safety", kind, ex) for ex in exs]
    random.Random(f"{seed}/shuffle/safety").shuffle(records)
    files["safety.jsonl"] = records

    rng = random.Random(f"{seed}/pretrain")
    avoid = frozenset(_eval_input(it) for split in EVAL_SPLITS for task in ("reverse", "sort", "lookup")
                      for it in files[f"eval/{split}/{task}.jsonl"])
    texts: list[str] = []
    while len(texts) < sizes["pretrain"]:
        text = gen_pretrain_text(rng, world, avoid)
        if len(text.encode()) <= MAX_CONTENT_BYTES:
            texts.append(text)
    files["pretrain.jsonl"] = [{"messages": [{"role": "assistant", "content": t}]} for t in texts]
    _assert_disjoint(files)
    return files


def _eval_input(item: dict) -> str:
    """What a reverse / sort / lookup item operates on: the letters after the colon, or the score list."""
    prompt = prompt_of(item)
    return prompt.split(". ")[0] if item["task"] == "lookup" else prompt.split(": ", 1)[1]


def prompt_of(record: dict) -> str:
    """The prompt text of a training record or eval item: its user turns joined (what dedup compares)."""
    return "\n".join(m["content"] for m in record["messages"] if m["role"] == "user")


def split_prompts(files: dict[str, list[dict]]) -> dict[str, set[str]]:
    """Prompt sets of train (every training file but pretrain) and of each eval split."""
    out: dict[str, set[str]] = {"train": set(), **{s: set() for s in EVAL_SPLITS}}
    for path, recs in files.items():
        split = path.split("/")[1] if path.startswith("eval/") else "train"
        if path != "pretrain.jsonl":
            out[split].update(prompt_of(r) for r in recs)
    return out


def _assert_disjoint(files: dict[str, list[dict]]) -> None:
    sets = split_prompts(files)
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sets[a] & sets[b]
            if common:  # a bug in the generator, not user input
                raise AssertionError(f"toy suite: {len(common)} prompts in both {a} and {b}, "
                                     f"e.g. {min(common)!r}")

# ------------------------------------------------------------------------------------------------ files


def train_tokenizer(files: dict[str, list[dict]], vocab_size: int = TOKENIZER_VOCAB) -> bytes:
    """A serialized SentencePiece BPE model trained on the suite's training texts (never its eval items).

    Why not the byte tokenizer: with bytes, copying a word means matching multi-byte prefixes in context, which
    a 2-layer model did not learn in thousands of steps (docs/toy-suite.md); with word pieces theta_G copies
    after tens of steps. Deterministic: one thread, fixed settings. The default normaliser maps newlines to
    spaces, so a word is the same piece at the start of a reply and inside a prompt. The chat markers are
    single pieces; ids 0-3 are pad/unk/BOS/EOS; byte fallback keeps any text encodable.
    """
    import io

    import sentencepiece as spm

    from ptm.data.chat import ROLES

    lines = [line for path, recs in sorted(files.items()) if not path.startswith("eval/")
             for r in recs for m in r["messages"] for line in m["content"].split("\n") if line]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, num_threads=1, minloglevel=2,
        user_defined_symbols=[f"<|{r}|>" for r in ROLES], pad_id=0, unk_id=1, bos_id=2, eos_id=3)
    return buf.getvalue()


def _encode(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _manifest(seed: int, sizes: dict[str, int], blobs: dict[str, bytes], counts: dict[str, int]) -> dict:
    return {"format": FORMAT, "version": VERSION, "seed": seed, "sizes": sizes,
            "max_content_bytes": MAX_CONTENT_BYTES, "refusal": REFUSAL, "eval_splits": list(EVAL_SPLITS),
            "safety_mix": SAFETY_MIX,
            "tasks": {t: {"category": s.category, "scorer": s.scorer, "dataset": s.dataset}
                      for t, s in SUITE_TASKS.items()},
            "counts": counts, "tokenizer": TOKENIZER_FILE, "tokenizer_vocab": TOKENIZER_VOCAB,
            "files": {p: hashlib.sha256(b).hexdigest() for p, b in sorted(blobs.items())}}


def _existing(out: Path, seed: int, sizes: dict[str, int]) -> dict | None:
    """The manifest of an intact suite at `out` with this seed and sizes; None if `out` is empty or absent."""
    mpath = out / "manifest.json"
    if not mpath.exists():
        if out.exists() and any(out.iterdir()):
            raise DataError(f"{out}: directory is not empty and has no manifest.json; refusing to write "
                            "the toy suite into it")
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{mpath}: unreadable toy-suite manifest: {e}") from e
    want = {"format": FORMAT, "version": VERSION, "seed": seed, "sizes": sizes}
    diff = {k: manifest.get(k) for k, v in want.items() if manifest.get(k) != v}
    if diff:
        raise DataError(f"{mpath}: existing toy suite differs ({diff}; wanted {want}); "
                        "use another directory or delete this one")
    for rel, digest in manifest.get("files", {}).items():
        f = out / rel
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            raise DataError(f"{f}: missing or changed since {mpath} was written; delete {out} to regenerate")
    return manifest


def generate_suite(out_dir: str | os.PathLike, *, seed: int = 0, sizes: dict | None = None) -> dict:
    """Write the toy suite to `out_dir` (local) and return its manifest. Same seed and sizes -> same bytes.

    If `out_dir` already holds this suite (same seed and sizes, files intact) nothing is rewritten. A
    different suite or unrelated files there raise DataError. The suite is written to a sibling temp dir and
    renamed into place, so a crash never leaves a half suite.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"toy suite: seed must be an integer, got {seed!r}")
    full = _check_sizes(sizes)
    out = Path(out_dir)
    found = _existing(out, seed, full)
    if found is not None:
        return found
    files = build_suite(seed, full)
    blobs = {p: _encode(recs) for p, recs in files.items()}
    blobs[TOKENIZER_FILE] = train_tokenizer(files)
    manifest = _manifest(seed, full, blobs, {p: len(r) for p, r in sorted(files.items())})
    blobs["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, data in blobs.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        if out.exists():
            out.rmdir()  # empty (checked above); a race that filled it fails here rather than clobbering
        tmp.rename(out)
    except OSError as e:
        raise DataError(f"{out}: cannot write the toy suite: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
