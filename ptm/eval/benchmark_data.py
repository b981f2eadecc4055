"""The paper's general benchmarks, from the Hugging Face datasets' parquet files to the JSONL files that the staged
lm-eval tasks read (`ptm.eval.lm_eval_stage`), with a validation split carved where the benchmark has none:

- MMLU, cais/mmlu (`<subject>/{dev,validation,test}-*.parquet`, or `all/` only) ->
  `mmlu/<subject>/{dev,validation,test}.jsonl`
- GSM8K, openai/gsm8k (`main/{train,test}-*.parquet`) -> `gsm8k/{train,validation,test}.jsonl`; validation = the
  last N problems of train, removed from it
- BBH, lukaemon/bbh or SaylorTwift/bbh (`<task>/test-*.parquet`) -> `bbh/<task>/{validation,test}.jsonl`; a seeded
  share of each task for validation
- TruthfulQA, truthfulqa/truthful_qa (`multiple_choice/validation-*.parquet`) -> `truthfulqa/{validation,test}.jsonl`;
  a seeded share for validation

(inputs: `huggingface-cli download REPO --repo-type dataset --local-dir DIR` directories.)
Why carve: a study selects on validation and reports test, and GSM8K, BBH and TruthfulQA publish no validation split.
The seeded share ranks rows by a hash of (seed, the row's JSON), so reruns and machines agree and file order is kept.
Every row is checked against the columns the lm-eval tasks read; a bad file or row is a DataError naming it, and a
benchmark's directory is built next to OUT and renamed into place only when whole (an existing one only with force).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ptm.errors import ConfigError, DataError
from ptm.eval.lm_eval_stage import replace_dir, staging_dir

SPLITS = ("train", "validation", "test", "dev", "auxiliary_train")
_SHARD = re.compile(r"^(?P<split>[a-z_]+?)(?:-\d{5}-of-\d{5}(?:-[0-9a-f]+)?)?$")
Rows = list[dict[str, Any]]


# ------------------------------------------------------------------------------------ reading


def parquet_splits(root: str | Path) -> dict[str, dict[str, list[Path]]]:
    """{config: {split: [parquet files]}} of a downloaded dataset repo: `<config>/<split>-00000-of-00001.parquet`
    (the Hub's layout; `data/` is config "default") or `<config>/<split>/0000.parquet` (its parquet conversion)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a downloaded dataset repo of parquet files)")
    found: dict[str, dict[str, list[Path]]] = {}
    for f in sorted(root.rglob("*.parquet")):
        parts = f.relative_to(root).parts
        if any(p.startswith(".") for p in parts):  # huggingface-cli's .cache/
            continue
        m = _SHARD.match(f.stem)
        if m and m["split"] in SPLITS:
            split, config = m["split"], parts[-2] if len(parts) > 1 else "default"
        elif f.stem.isdigit() and len(parts) > 1 and parts[-2] in SPLITS:
            split, config = parts[-2], parts[-3] if len(parts) > 2 else "default"
        else:
            raise DataError(f"{f}: cannot tell its split from the name (expected <config>/<split>-00000-of-00001"
                            f".parquet or <config>/<split>/0000.parquet, split one of {SPLITS})")
        config = "default" if config == "data" else config
        found.setdefault(config, {}).setdefault(split, []).append(f)
    if not found:
        raise DataError(f"{root}: no .parquet files below it")
    return found


def read_rows(files: list[Path], columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> Rows:
    """The rows of parquet shards (in order): `columns`, each of which must be there, and `optional` ones."""
    import pyarrow.parquet as pq

    rows: Rows = []
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as e:  # pyarrow raises several types for a damaged or non-parquet file
            raise DataError(f"{f}: cannot read parquet: {e}") from None
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DataError(f"{f}: no column(s) {missing} (has {table.column_names})")
        rows += table.select([*columns, *(c for c in optional if c in table.column_names)]).to_pylist()
    return rows


def _need(splits: Mapping[str, list[Path]], split: str, where: str) -> list[Path]:
    if split not in splits:
        raise DataError(f"{where}: no {split!r} split (found {sorted(splits)})")
    return splits[split]


def _config(found: dict[str, dict[str, list[Path]]], names: tuple[str, ...], root: Path) -> dict[str, list[Path]]:
    for n in names:
        if n in found:
            return found[n]
    if len(found) == 1:
        return next(iter(found.values()))
    raise DataError(f"{root}: none of the configs {list(names)} (found {sorted(found)})")


# ------------------------------------------------------------------------------------ checks


def _bad(files: list[Path], i: int, msg: str) -> DataError:
    return DataError(f"{', '.join(map(str, files))}: row {i}: {msg}")


def _strings(row: dict, keys: tuple[str, ...], files: list[Path], i: int) -> None:
    for k in keys:
        if not isinstance(row[k], str) or not row[k].strip():
            raise _bad(files, i, f"{k!r} must be a non-empty string, got {row[k]!r}")


def _check_mmlu(rows: Rows, files: list[Path]) -> None:
    for i, r in enumerate(rows):
        _strings(r, ("question",), files, i)
        ch, a = r["choices"], r["answer"]
        if not isinstance(ch, list) or len(ch) != 4 or not all(isinstance(c, str) for c in ch):
            raise _bad(files, i, f"'choices' must be 4 strings, got {ch!r}")
        if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < 4:
            raise _bad(files, i, f"'answer' must be 0-3, got {a!r}")


def _check_gsm8k(rows: Rows, files: list[Path]) -> None:
    for i, r in enumerate(rows):
        _strings(r, ("question", "answer"), files, i)
        if "####" not in r["answer"]:
            raise _bad(files, i, "'answer' has no '#### N' final answer")


def _check_bbh(rows: Rows, files: list[Path]) -> None:
    for i, r in enumerate(rows):
        _strings(r, ("input", "target"), files, i)


def _check_targets(r: dict, key: str, files: list[Path], i: int, one_true: bool) -> None:
    t = r[key]
    ch, lab = (t.get("choices"), t.get("labels")) if isinstance(t, dict) else (None, None)
    if (not isinstance(ch, list) or not isinstance(lab, list) or not ch or len(ch) != len(lab)
            or not all(isinstance(c, str) for c in ch) or not all(x in (0, 1) for x in lab)):
        raise _bad(files, i, f"{key!r} must be {{choices: [str], labels: [0/1]}} of equal length, got {t!r}")
    if (sum(lab) != 1 or lab[0] != 1) if one_true else lab[0] != 1:
        raise _bad(files, i, f"{key!r}: the first choice must be the (only, for mc1) true one, as lm-eval scores it")


def _check_truthfulqa(rows: Rows, files: list[Path]) -> None:
    for i, r in enumerate(rows):
        _strings(r, ("question",), files, i)
        _check_targets(r, "mc1_targets", files, i, True)
        _check_targets(r, "mc2_targets", files, i, False)


# ------------------------------------------------------------------------------------ splitting


def seeded_share(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """(validation, test): round(fraction * n) rows chosen by a seeded hash of each row, file order kept."""
    if not 0 < fraction < 1:
        raise ConfigError(f"validation fraction {fraction}: expected a number in (0, 1)")
    keys = [hashlib.sha256(f"{seed}:{json.dumps(r, sort_keys=True)}:{i}".encode()).hexdigest()
            for i, r in enumerate(rows)]
    k = round(fraction * len(rows))
    if not 0 < k < len(rows):
        raise ConfigError(f"validation fraction {fraction} of {len(rows)} rows leaves an empty split")
    chosen = set(sorted(range(len(rows)), key=keys.__getitem__)[:k])
    return [r for i, r in enumerate(rows) if i in chosen], [r for i, r in enumerate(rows) if i not in chosen]


# ------------------------------------------------------------------------------------ benchmarks


@dataclasses.dataclass(frozen=True)
class Options:
    gsm8k_validation: int = 500  # last N problems of GSM8K's train held out
    bbh_validation_fraction: float = 0.2  # ~50 of each BBH task's ~250
    truthfulqa_validation_fraction: float = 0.25  # ~204 of 817
    seed: int = 0


def convert_mmlu(root: Path, opt: Options) -> dict[str, Rows]:
    cols, extra = ("question", "choices", "answer"), ("subject",)
    found = parquet_splits(root)
    subjects = {c: s for c, s in found.items() if c not in ("all", "auxiliary_train", "default")}
    out: dict[str, Rows] = {}
    if subjects:
        for subj, splits in sorted(subjects.items()):
            for sp in ("dev", "validation", "test"):
                files = _need(splits, sp, f"{root}/{subj}")
                rows = read_rows(files, cols, extra)
                _check_mmlu(rows, files)
                out[f"mmlu/{subj}/{sp}.jsonl"] = rows
        return out
    splits = _config(found, ("all", "default"), root)  # one table of every subject: split by its column
    for sp in ("dev", "validation", "test"):
        files = _need(splits, sp, str(root))
        rows = read_rows(files, (*cols, *extra))
        _check_mmlu(rows, files)
        for i, r in enumerate(rows):
            if not isinstance(r["subject"], str) or not re.fullmatch(r"[a-z_]+", r["subject"]):
                raise _bad(files, i, f"'subject' must name an MMLU subject, got {r['subject']!r}")
            out.setdefault(f"mmlu/{r['subject']}/{sp}.jsonl", []).append(r)
    return out


def convert_gsm8k(root: Path, opt: Options) -> dict[str, Rows]:
    splits = _config(parquet_splits(root), ("main",), root)
    out = {}
    for sp in ("train", "test"):
        files = _need(splits, sp, str(root))
        out[sp] = read_rows(files, ("question", "answer"))
        _check_gsm8k(out[sp], files)
    n = opt.gsm8k_validation
    if not 0 < n < len(out["train"]):
        raise ConfigError(f"GSM8K validation size {n}: expected 1..{len(out['train']) - 1} (train has "
                          f"{len(out['train'])} problems)")
    train = out["train"]
    return {"gsm8k/train.jsonl": train[:-n], "gsm8k/validation.jsonl": train[-n:], "gsm8k/test.jsonl": out["test"]}


def convert_bbh(root: Path, opt: Options) -> dict[str, Rows]:
    out: dict[str, Rows] = {}
    for task, splits in sorted(parquet_splits(root).items()):
        files = _need(splits, "test", f"{root}/{task}")
        rows = read_rows(files, ("input", "target"))
        _check_bbh(rows, files)
        val, test = seeded_share(rows, opt.bbh_validation_fraction, opt.seed)
        out[f"bbh/{task}/validation.jsonl"], out[f"bbh/{task}/test.jsonl"] = val, test
    return out


def convert_truthfulqa(root: Path, opt: Options) -> dict[str, Rows]:
    splits = _config(parquet_splits(root), ("multiple_choice",), root)
    files = _need(splits, "validation", str(root))
    rows = read_rows(files, ("question", "mc1_targets", "mc2_targets"))
    _check_truthfulqa(rows, files)
    val, test = seeded_share(rows, opt.truthfulqa_validation_fraction, opt.seed)
    return {"truthfulqa/validation.jsonl": val, "truthfulqa/test.jsonl": test}


CONVERTERS: dict[str, Callable[[Path, Options], dict[str, Rows]]] = {
    "mmlu": convert_mmlu, "gsm8k": convert_gsm8k, "bbh": convert_bbh, "truthfulqa": convert_truthfulqa}


def convert(sources: Mapping[str, str | Path], out: str | Path, opt: Options = Options(), *,
            force: bool = False) -> dict[str, dict[str, int]]:
    """Convert {benchmark: downloaded dir} into OUT/<benchmark>/...; returns {benchmark: {file: rows}}. Everything
    is read and checked before anything is written; each benchmark directory then appears whole or not at all."""
    unknown = sorted(set(sources) - set(CONVERTERS))
    if unknown or not sources:
        raise ConfigError(f"benchmarks {unknown or []}: expected some of {sorted(CONVERTERS)}")
    out = Path(out)
    if not force:
        exists = [str(out / b) for b in sources if (out / b).exists()]
        if exists:
            raise ConfigError(f"{', '.join(exists)}: already exists (use --force to replace)")
    plans = {b: CONVERTERS[b](Path(src), opt) for b, src in sources.items()}
    counts = {}
    for bench, files in plans.items():
        tmp = staging_dir(out / bench)
        try:
            for rel, rows in files.items():
                dst = tmp / Path(rel).relative_to(bench)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            (tmp / "ptm_sources.json").write_text(json.dumps(
                {"source": str(Path(sources[bench]).resolve()), "options": dataclasses.asdict(opt),
                 "rows": {rel: len(rows) for rel, rows in files.items()}}, indent=1) + "\n")
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, out / bench, force)
        counts[bench] = {rel: len(rows) for rel, rows in files.items()}
    return counts
