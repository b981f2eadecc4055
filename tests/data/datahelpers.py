"""Plain helpers shared by the data tests (kept out of conftest.py so imports are unambiguous)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "<|system|>\nBe brief.\n<|user|>\nWhat is two plus two?\n<|assistant|>\nFour.",
] * 40


def write_jsonl(path: Path, records) -> str:
    """One JSON object per line; a `str` record is written verbatim (for malformed-input tests)."""
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def conv(user: str, reply: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": msgs}
