"""Eval-set files: JSONL, one item per line (see docs/eval.md).

    {"task": "mmlu_astronomy", "messages": [{"role": "user", "content": "..."}], "reference": "...",
     "scorer": "multiple_choice", "choices": [...], "category": "general", "meta": {...}, "id": "..."}

`task`, `messages`, `reference`, `scorer` are required; `category` defaults to "general"; `choices` only for
multiple_choice; `meta` and `id` are optional. A suite is a directory (every `*.jsonl` under it, sorted)
or a list of files/directories, local or gs://. Every problem is reported as a DataError naming file:line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from etils import epath

from ptm.errors import DataError
from ptm.eval import scorers

REQUIRED = ("task", "messages", "reference", "scorer")
OPTIONAL = ("choices", "category", "meta", "id")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class EvalItem:
    task: str
    messages: list[dict[str, str]]
    reference: str | list[str]
    scorer: str
    category: str = "general"
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    where: str = ""  # "file:line", for error messages

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "where"}
        return {k: v for k, v in d.items() if v is not None and not (k == "meta" and not v)}


def parse_item(obj: Any, where: str) -> EvalItem:
    """Validate one decoded JSON object; raise DataError naming `where` (file:line) on any problem."""

    def bad(msg: str) -> DataError:
        return DataError(f"{where}: {msg}")

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise bad(f"missing required field(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise bad(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    task, category = obj["task"], obj.get("category", "general")
    if not (isinstance(task, str) and task):
        raise bad("'task' must be a non-empty string")
    if not (isinstance(category, str) and category):
        raise bad("'category' must be a non-empty string")
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise bad("'messages' must be a list of {role, content} objects")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise bad(
                f"messages[{i}] must be {{'role': one of {'/'.join(ROLES)}, 'content': str}}, got {m!r}"
            )
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise bad("'meta' must be an object")
    scorer = obj["scorer"]
    if not isinstance(scorer, str):
        raise bad("'scorer' must be a string")
    choices = obj.get("choices")
    if choices is not None and scorer != "multiple_choice":
        raise bad(f"'choices' is only used by the multiple_choice scorer, not {scorer!r}")
    if scorer != "perplexity" and not msgs:
        raise bad("'messages' is empty: there is no prompt")
    err = scorers.validate_item(scorer, obj["reference"], choices, meta)
    if err:
        raise bad(err)
    item_id = obj.get("id")
    if item_id is not None and not isinstance(item_id, str | int):
        raise bad("'id' must be a string or integer")
    return EvalItem(
        task=task,
        messages=msgs,
        reference=obj["reference"],
        scorer=scorer,
        category=category,
        choices=choices,
        meta=meta,
        id=None if item_id is None else str(item_id),
        where=where,
    )


def load_eval_file(path: str | epath.Path) -> list[EvalItem]:
    p = epath.Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{p}: eval file not found") from e
    except OSError as e:
        raise DataError(f"{p}: cannot read eval file: {e}") from e
    from ptm.data.sources import iter_jsonl

    # Raw lines, decoded per line by iter_jsonl (a bad byte is reported with its line). bytes.splitlines splits at
    # \n, \r and \r\n only; str.splitlines also splits at U+2028/U+2029, which json.dumps(ensure_ascii=False)
    # leaves raw inside strings (write_eval_file writes that way).
    return [parse_item(obj, where) for where, obj in iter_jsonl(raw.splitlines(), str(p))]


def _walk_jsonl(d: epath.Path) -> list[epath.Path]:
    # Explicit walk: epath's rglob refuses `**` on gs://.
    out = []
    for c in d.iterdir():
        if c.is_dir():
            out.extend(_walk_jsonl(c))
        elif c.name.endswith(".jsonl"):
            out.append(c)
    return out


def suite_files(suite: str | epath.Path | Sequence[str | epath.Path]) -> list[epath.Path]:
    """Expand a directory (all *.jsonl below it, sorted) or a list of files/directories to eval files."""
    entries = [suite] if isinstance(suite, str | os.PathLike) else list(suite)
    files: list[epath.Path] = []
    for e in entries:
        p = epath.Path(e)
        if p.is_dir():
            found = sorted(_walk_jsonl(p), key=str)
            if not found:
                raise DataError(f"{p}: directory has no *.jsonl eval files")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: no such eval file or directory")
    if not files:
        raise DataError("empty eval suite: no files given")
    return files


SEQIO_PREFIX = "seqio:"
SEQIO_OPTIONS = ("scorer", "category", "max_items")
# seqio / t5 metric function -> ptm scorer, where one means the other (t5.evaluation.metrics, seqio.metrics)
SEQIO_METRIC_SCORERS = {"accuracy": "exact_match", "sequence_accuracy": "exact_match", "exact_match": "exact_match",
                        "squad": "exact_match", "trivia_qa": "exact_match", "em": "exact_match"}


def _is_seqio(entry: Any) -> bool:
    return isinstance(entry, str) and entry.startswith(SEQIO_PREFIX)


def load_seqio_set(spec: str) -> list[EvalItem]:
    """`seqio:TASK[:SPLIT][?scorer=NAME&category=C&max_items=N]`: a registered seqio Task's split (default
    `validation`) as eval items: its `inputs` text is the prompt, its `targets` text the reference. A Mixture
    gives each of its Tasks as an eval task of its own (rates ignored), each with its own scorer.

    The scorer is `scorer=` if given, else the Task's metric functions mapped by SEQIO_METRIC_SCORERS (e.g.
    `sequence_accuracy` -> exact_match), else `perplexity` for a targets-only Task; anything else is a DataError
    naming the Task's metrics. The Task's module must be imported first (`ptm eval --seqio_module`, the
    experiment's `[seqio] modules`). seqio is imported only here, never when evalset is imported.
    """
    from urllib.parse import parse_qsl

    from ptm.data import seqio_source

    base, _, query = spec.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))) if query else {}
    bad = sorted(set(opts) - set(SEQIO_OPTIONS))
    if bad:
        raise DataError(f"{spec}: unknown option(s) {bad}; allowed: {', '.join(SEQIO_OPTIONS)}")
    name, split = seqio_source.task_and_split(base)
    try:
        max_items = int(opts["max_items"]) if opts.get("max_items") else None
    except ValueError:
        raise DataError(f"{spec}: max_items must be an integer, got {opts['max_items']!r}") from None
    items = []
    for task in seqio_source.subtask_names(name):  # a Mixture is a suite: one eval task per Task
        scorer = opts.get("scorer") or _seqio_scorer(task, spec)
        recs = seqio_source.eval_records(f"{SEQIO_PREFIX}{task}", split, scorer, max_items=max_items)
        if opts.get("category"):
            recs = [{**r, "category": opts["category"]} for r in recs]
        items += [parse_item(r, f"{SEQIO_PREFIX}{task}:{split}:item {i}") for i, r in enumerate(recs, 1)]
    return items


def _seqio_scorer(task: str, spec: str) -> str:
    from ptm.data import seqio_source

    names = seqio_source.metric_names(task)
    mapped = sorted({SEQIO_METRIC_SCORERS[n] for n in names if n in SEQIO_METRIC_SCORERS})
    if len(mapped) == 1:
        return mapped[0]
    if not names and "inputs" not in seqio_source.get_provider(task).output_features:
        return "perplexity"
    raise DataError(f"{spec}: cannot choose a scorer from the Task's metrics {names or '(none)'} (ptm maps "
                    f"{sorted(SEQIO_METRIC_SCORERS)}); add ?scorer=NAME (one of {', '.join(sorted(scorers.SCORERS))})")


def load_suite(suite: str | epath.Path | Sequence[str | epath.Path]) -> list[EvalItem]:
    """Every item of a suite: eval files and directories, and `seqio:TASK[:SPLIT][?...]` entries
    (`load_seqio_set`)."""
    entries = [suite] if isinstance(suite, str | os.PathLike) else list(suite)
    items: list[EvalItem] = []
    for e in entries:  # in the order given
        if _is_seqio(e):
            items.extend(load_seqio_set(e))
        else:
            for f in suite_files(e):
                items.extend(load_eval_file(f))
    if not items:
        raise DataError(f"eval suite {suite} has no items")
    return items


def write_eval_file(path: str | epath.Path, items: Iterable[EvalItem | dict[str, Any]]) -> int:
    """Validate and write items as JSONL (for generators such as ptm.data.toy); returns the item count.

    Everything is validated before anything is written; local files are written to a temporary name and
    renamed (a GCS object upload is atomic by itself)."""
    p = epath.Path(path)
    lines = []
    for i, it in enumerate(items, start=1):
        obj = it.to_json() if isinstance(it, EvalItem) else dict(it)
        parse_item(obj, f"{p}:{i}")  # refuse to write what we could not read back
        lines.append(json.dumps(obj, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    p.parent.mkdir(parents=True, exist_ok=True)
    if str(p).startswith("gs://"):
        p.write_text(text)
        return len(lines)
    tmp = p.parent / f".{p.name}.tmp"
    tmp.write_text(text)
    tmp.replace(p)  # rename() refuses an existing destination
    return len(lines)
