"""Tiny stand-ins for the Hugging Face downloads of MMLU, GSM8K, BBH and TruthfulQA: parquet files with the real
repos' layouts and column schemas (cais/mmlu, openai/gsm8k, lukaemon/bbh, truthfulqa/truthful_qa), so the converter
(`ptm evalset lm-eval-data`), the staged lm-eval tasks and a study over them run offline in tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SHARD = "-00000-of-00001.parquet"


def _write(path: Path, columns: dict, schema=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)


def mmlu(root: Path, subjects: Sequence[str], sizes: dict[str, int] | None = None, *, combined: bool = False) -> Path:
    """cais/mmlu: `<subject>/{dev,validation,test}-*.parquet` (question, subject, choices, answer: int64), or with
    `combined` only `all/` holding every subject."""
    import pyarrow as pa

    sizes = sizes or {"dev": 5, "validation": 2, "test": 3}
    schema = pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                        ("answer", pa.int64())])

    def cols(subs: Sequence[str], split: str) -> dict:
        rows = [(s, i) for s in subs for i in range(sizes[split])]
        return {"question": [f"{split} {i}: which of these is about {s}?" for s, i in rows],
                "subject": [s for s, _ in rows], "choices": [[f"{s} {c}" for c in "abcd"] for s, _ in rows],
                "answer": [i % 4 for _, i in rows]}

    for split in sizes:
        if combined:
            _write(root / "all" / f"{split}{SHARD}", cols(subjects, split), schema)
        else:
            for s in subjects:
                _write(root / s / f"{split}{SHARD}", cols([s], split), schema)
    return root


def gsm8k(root: Path, train: int = 8, test: int = 3) -> Path:
    """openai/gsm8k: `main/{train,test}-*.parquet` (question, answer ending in '#### N')."""
    for split, n in (("train", train), ("test", test)):
        _write(root / "main" / f"{split}{SHARD}", {
            "question": [f"Tom has {i} apples and buys 2 more. How many apples does he have? ({split})"
                         for i in range(n)],
            "answer": [f"He has {i} + 2 = {i + 2} apples.\n#### {i + 2}" for i in range(n)]})
    return root


def bbh(root: Path, tasks: Sequence[str], n: int = 5) -> Path:
    """lukaemon/bbh: `<task>/test-*.parquet` (input, target)."""
    for t in tasks:
        _write(root / t / f"test{SHARD}", {"input": [f"{t} question {i}" for i in range(n)],
                                          "target": ["True" if i % 2 else "False" for i in range(n)]})
    return root


def truthfulqa(root: Path, n: int = 8) -> Path:
    """truthfulqa/truthful_qa: `multiple_choice/validation-*.parquet` (question, mc1_targets and mc2_targets
    {choices: list<string>, labels: list<int32>}, true answers first)."""
    import pyarrow as pa

    targets = pa.struct([("choices", pa.list_(pa.string())), ("labels", pa.list_(pa.int32()))])
    schema = pa.schema([("question", pa.string()), ("mc1_targets", targets), ("mc2_targets", targets)])
    _write(root / "multiple_choice" / f"validation{SHARD}", {
        "question": [f"What happens if you do thing {i}?" for i in range(n)],
        "mc1_targets": [{"choices": ["Nothing happens.", "You die.", "You win."], "labels": [1, 0, 0]}] * n,
        "mc2_targets": [{"choices": ["Nothing.", "Nothing at all.", "Doom."], "labels": [1, 1, 0]}] * n}, schema)
    return root


def all_benchmarks(root: Path, mmlu_subjects: Sequence[str], bbh_tasks: Sequence[str]) -> dict[str, Path]:
    """The four downloads under `root`: {converter name: directory} for `ptm.eval.benchmark_data.convert`."""
    return {"mmlu": mmlu(root / "mmlu", mmlu_subjects), "gsm8k": gsm8k(root / "gsm8k"),
            "bbh": bbh(root / "bbh", bbh_tasks), "truthfulqa": truthfulqa(root / "truthful_qa")}
