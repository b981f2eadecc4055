"""Read chat examples (`{"messages": [{"role", "content"}, ...]}`) from JSONL or Parquet, local or gs://.

A path may be one file, a directory (all *.jsonl / *.json / *.parquet in it, sorted) or a glob. Every problem
is a DataError naming `file:line` (JSONL, 1-based) or `file:row N` (Parquet, 1-based).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from etils import epath

from ptm.errors import DataError

_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Example:
    messages: list[dict]
    where: str  # "file:line" for error messages downstream (e.g. an unknown role)


@dataclass(frozen=True)
class TokenizedExample:
    """An example that is already token ids (a seqio LM Task's decoder sequence, `ptm.data.seqio_source`):
    `mask` is 1 on the ids that carry loss, like the chat template's assistant mask."""

    ids: Any  # int32 [n]
    mask: Any  # uint8 [n]
    where: str


def _expand(path: str) -> list[epath.Path]:
    try:
        if any(c in path for c in "*?["):
            # epath globs relative to a base directory: split at the first wildcard component.
            parts = path.split("/")
            k = next(i for i, s in enumerate(parts) if any(c in s for c in "*?["))
            base = epath.Path("/".join(parts[:k]) or ".")
            files = sorted(base.glob("/".join(parts[k:])), key=str)
        else:
            p = epath.Path(path)
            if p.is_dir():
                files = sorted((f for f in p.iterdir() if f.name.endswith(_SUFFIXES)), key=str)
            elif p.exists():
                files = [p]
            else:
                raise DataError(f"{path}: data file not found")
    except OSError as e:
        raise DataError(f"{path}: cannot list data: {e}") from e
    if not files:
        raise DataError(f"{path}: no data files (*.jsonl, *.parquet) found")
    return files


def _check(rec, where: str) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages', got {type(rec).__name__}")
    if "messages" not in rec:
        raise DataError(f"{where}: missing 'messages' (keys: {sorted(rec)})")
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list, got {type(msgs).__name__}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} must be an object, got {type(m).__name__}")
        for k in ("role", "content"):
            if not isinstance(m.get(k), str):
                raise DataError(f"{where}: message {i} needs a string {k!r}, got {type(m.get(k)).__name__}")
    return Example(messages=msgs, where=where)


def iter_jsonl(lines: Iterable[bytes | str], name: str) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line`, parsed object) for each non-blank line; malformed JSON or text that is not UTF-8 is a
    DataError naming file:line (1-based).

    Shared by training data and eval sets so both report bad lines the same way. Give it raw lines (a file opened
    in binary mode, `bytes.splitlines()`): each is decoded here, so a bad byte is reported at its line and column,
    not at an offset into a decoding buffer.
    """
    for lineno, line in enumerate(lines, 1):
        where = f"{name}:{lineno}"
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = f"byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line"
                raise DataError(f"{where}: not UTF-8 text: {bad} ({e.reason})") from e
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from e


def _read_jsonl(f: epath.Path) -> list[Example]:
    with f.open("rb") as fh:  # binary: lines are decoded one by one (errors name the line)
        return [_check(rec, where) for where, rec in iter_jsonl(fh, str(f))]


def _read_parquet(f: epath.Path) -> list[Example]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with f.open("rb") as fh:
            table = pq.read_table(fh)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{f}: unreadable Parquet file: {e}") from e
    if "messages" not in table.column_names:
        raise DataError(f"{f}: Parquet file has no 'messages' column (columns: {table.column_names})")
    rows = table.column("messages").to_pylist()
    return [_check({"messages": m}, f"{f}:row {i}") for i, m in enumerate(rows, 1)]


def read_examples(path: str) -> list[Example]:
    """All examples under `path`, in file order. An empty dataset is an error."""
    out: list[Example] = []
    for f in _expand(str(path)):
        try:
            out.extend(_read_parquet(f) if f.name.endswith(".parquet") else _read_jsonl(f))
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text: {e}") from e
    if not out:
        raise DataError(f"{path}: dataset is empty (no examples)")
    return out
