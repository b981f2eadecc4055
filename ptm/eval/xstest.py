"""XSTest (Röttger et al. 2024, arXiv 2308.01263) as ptm eval sets: safe look-alikes the model must answer and
unsafe contrasts it must refuse, scored by the `refusal` scorer.

Input: the published CSV, `xstest_prompts.csv` with columns `id,prompt,type,label,focus,note` (label `safe` /
`unsafe`; 250 safe prompts in 10 types, 200 unsafe `contrast_*` ones). The earlier `xstest_v2_prompts.csv`
(`id_v1,id_v2,type,prompt,focus,note`, no label) works too: a `contrast_*` type is unsafe, any other safe. Extra
columns are kept in `meta`.

Output: items of two tasks, `xstest_safe` (reference "comply": the paper's XSTest Safe, higher = fewer exaggerated
refusals; a study's `benign_tasks`) and `xstest_unsafe` (reference "refuse"), category "safety", split into
`validation/xstest.jsonl` and `test/xstest.jsonl` (a fixed fraction of each label by a seeded hash of the id, so a
rerun gives the same split) -- a study selects on validation and reports test, never both from one set.
Every bad row is a DataError naming `file:line`; nothing is written unless the whole file converts, and existing
outputs are kept unless `force`.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from typing import Any

from etils import epath

from ptm.errors import ConfigError, DataError
from ptm.eval.evalset import EvalItem, write_eval_file

LABELS = {"safe": "comply", "unsafe": "refuse"}
TASKS = {"safe": "xstest_safe", "unsafe": "xstest_unsafe"}
ID_COLUMNS = ("id", "id_v2", "id_v1")
OUT_NAME = "xstest.jsonl"


def read_xstest(path: str | epath.Path, tasks: dict[str, str] | None = None) -> list[EvalItem]:
    """The CSV's rows as eval items (in file order)."""
    p = epath.Path(path)
    tasks = {**TASKS, **(tasks or {})}
    try:
        text = p.read_text(encoding="utf-8-sig")  # a spreadsheet's BOM is not part of the first column's name
    except FileNotFoundError:
        raise DataError(f"{p}: XSTest CSV not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read XSTest CSV: {e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("prompt", "type") if c not in cols]
    if missing:
        raise DataError(f"{p}:1: header lacks column(s) {missing} (found {cols}); expected XSTest's "
                        "id,prompt,type,label,focus,note")
    reader.fieldnames = cols
    id_col = next((c for c in ID_COLUMNS if c in cols), None)
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            where = f"{p}:{line}"
            extra, absent = row.pop(None, None) or [], sum(v is None for v in row.values())
            if extra or absent:
                got = len(cols) + len(extra) - absent
                raise DataError(f"{where}: expected {len(cols)} fields ({', '.join(cols)}), got {got}")
            if not any(v.strip() for v in row.values()):
                continue  # a blank line
            prompt, typ = row["prompt"].strip(), row["type"].strip()
            if not prompt:
                raise DataError(f"{where}: empty prompt")
            if not typ:
                raise DataError(f"{where}: empty type")
            label = row.get("label", "").strip().lower() if "label" in row else (
                "unsafe" if typ.startswith("contrast_") else "safe")
            if label not in LABELS:
                raise DataError(f"{where}: label {row.get('label')!r}: expected 'safe' or 'unsafe'")
            rid = (row[id_col].strip() if id_col else "") or str(line)
            if rid in seen:
                raise DataError(f"{where}: id {rid!r} repeats line {seen[rid]}")
            seen[rid] = line
            meta: dict[str, Any] = {k: v for k, v in row.items() if k not in ("prompt", "label") and v.strip()}
            meta.update(label=label, source=f"{p.name}:{line}")
            items.append(EvalItem(task=tasks[label], messages=[{"role": "user", "content": prompt}],
                                  reference=LABELS[label], scorer="refusal", category="safety", meta=meta,
                                  id=f"xstest-{rid}", where=where))
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: bad CSV: {e}") from None
    if not items:
        raise DataError(f"{p}: no prompts")
    return items


def _rank(seed: int, item: EvalItem) -> str:
    return hashlib.sha256(f"{seed}:{item.id}".encode()).hexdigest()


def split(items: Sequence[EvalItem], validation_fraction: float,
          seed: int = 0) -> tuple[list[EvalItem], list[EvalItem]]:
    """(validation, test): round(fraction * n) items of each task by seeded hash order; file order kept."""
    if not 0 <= validation_fraction < 1:
        raise ConfigError(f"validation fraction {validation_fraction}: expected a number in [0, 1)")
    val_ids: set[str | None] = set()
    for task in dict.fromkeys(it.task for it in items):
        group = sorted((it for it in items if it.task == task), key=lambda it: _rank(seed, it))
        val_ids.update(it.id for it in group[: round(validation_fraction * len(group))])
    return [it for it in items if it.id in val_ids], [it for it in items if it.id not in val_ids]


def convert(csv_path: str | epath.Path, out_dir: str | epath.Path, *, validation_fraction: float = 0.2,
            seed: int = 0, force: bool = False, tasks: dict[str, str] | None = None) -> dict[str, dict[str, int]]:
    """Write `out_dir/{validation,test}/xstest.jsonl` (validation only if the fraction is > 0); returns the item
    counts per split and task."""
    items = read_xstest(csv_path, tasks)
    val, test = split(items, validation_fraction, seed)
    out = epath.Path(out_dir)
    plan = {"validation": val, "test": test} if val else {"test": test}
    targets = {s: out / s / OUT_NAME for s in plan}
    if not force:
        exists = [str(t) for t in targets.values() if t.exists()]
        if exists:
            raise ConfigError(f"{', '.join(exists)}: already exists (use --force to overwrite)")
    counts = {}
    for s, its in plan.items():
        write_eval_file(targets[s], its)
        counts[s] = {t: sum(it.task == t for it in its) for t in dict.fromkeys(it.task for it in its)}
    return counts
