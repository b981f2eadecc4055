"""Offline copies of lm-eval's own task definitions for the paper's general benchmarks.

`write_task_yamls(out)` reads the installed lm-eval package's task YAMLs for `mmlu` (57 subjects, 4 category groups
and the group), `bbh_cot_fewshot` (27 tasks and the group), `gsm8k`, `truthfulqa_mc1` (and `truthfulqa_mc2`) and
writes them to `out` in lm-eval's own directory layout. Templates (`include:`), group files and the Python modules
next to them (`!function utils.x` stays resolvable) are copied as they are; every leaf task keeps its name, prompt,
few-shot setup, filters and metrics, and only where the documents come from changes:

    dataset_path: json, dataset_name: null
    dataset_kwargs.data_files: {SPLIT: "${PTM_LM_EVAL_DATA}/<data dir>/SPLIT.jsonl"} for each split it names
    validation_split: validation, test_split: test      (different files: a study selects on validation)

The data files are what `ptm.eval.benchmark_data` writes. Names stay lm-eval's (`gsm8k`, `mmlu_astronomy`, ...):
given as `--lm-eval-include`, lm-eval 0.4's TaskManager indexes include paths after its built-in tasks and a later
path overrides an earlier one, so these definitions win; ptm's `task_manager` skips the built-ins altogether when the
include paths define every requested name. Why not hand-written YAMLs: ~90 files that drift from lm-eval's prompts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ptm.errors import ConfigError, DataError

DATA_VAR = "${PTM_LM_EVAL_DATA}"
STUDY_SPLITS = {"validation_split": "validation", "test_split": "test"}
MANIFEST = "ptm_lm_eval_tasks.json"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One lm-eval task or group and where its staged documents live."""

    name: str  # the lm-eval task/group name
    source: str  # directory under lm_eval/tasks holding its YAMLs
    data: str  # directory under ${PTM_LM_EVAL_DATA}
    per_subset: bool  # one data directory per leaf task's HF `dataset_name` (MMLU subjects, BBH tasks)


BENCHMARKS = {b.name: b for b in (
    Benchmark("mmlu", "mmlu/default", "mmlu", True),
    Benchmark("bbh_cot_fewshot", "bbh/cot_fewshot", "bbh", True),
    Benchmark("gsm8k", "gsm8k", "gsm8k", False),
    Benchmark("truthfulqa_mc1", "truthfulqa", "truthfulqa", False),
    Benchmark("truthfulqa_mc2", "truthfulqa", "truthfulqa", False),
)}
DEFAULT_TASKS = ("mmlu", "bbh_cot_fewshot", "gsm8k", "truthfulqa_mc1")


# ------------------------------------------------------------------------------------ YAML with !function kept


class FunctionRef(str):
    """A `!function module.name` reference, kept as text so the copy resolves it next to itself."""


def _yaml():
    import yaml  # lm-eval's dependency; only needed when staging

    return yaml


def _loader():
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda ld, node: FunctionRef(ld.construct_scalar(node)))
    return Loader


def _dumper():
    yaml = _yaml()

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(FunctionRef, lambda d, v: d.represent_scalar("!function", str(v)))
    return Dumper


def read_yaml(path: Path) -> dict[str, Any]:
    """One YAML file as written (includes not resolved, `!function` as FunctionRef)."""
    yaml = _yaml()
    try:
        cfg = yaml.load(path.read_text(), Loader=_loader())  # noqa: S506 - a SafeLoader with one extra tag
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read task YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: expected a YAML mapping, got {type(cfg).__name__}")
    return cfg


def _includes(path: Path) -> list[Path]:
    inc = read_yaml(path).get("include")
    out = []
    for i in ([] if inc is None else inc if isinstance(inc, list) else [inc]):
        p = Path(i) if Path(i).is_absolute() else path.parent / i
        out += [p, *_includes(p)]
    return out


def resolved(path: Path) -> dict[str, Any]:
    """The task config with includes merged (local keys win), as lm-eval merges them."""
    merged: dict[str, Any] = {}
    for inc in reversed(_includes(path)):
        merged.update({k: v for k, v in read_yaml(inc).items() if k != "include"})
    merged.update({k: v for k, v in read_yaml(path).items() if k != "include"})
    return merged


# ------------------------------------------------------------------------------------ lm-eval's task tree


def lm_eval_tasks_dir() -> Path:
    """The installed lm-eval package's task directory."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("staging lm-eval tasks needs lm-evaluation-harness: pip install 'ptm[lm_eval]'")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


@dataclasses.dataclass
class _Tree:
    """The files one benchmark needs: leaf task YAMLs and the rest (groups, templates, Python modules)."""

    leaves: dict[str, Path] = dataclasses.field(default_factory=dict)  # task name -> YAML
    others: set[Path] = dataclasses.field(default_factory=set)


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("lm_eval")
    except md.PackageNotFoundError:
        return "?"


def _index(source: Path) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(source), include_defaults=False).task_index


def _collect(name: str, index: dict[str, Any], tree: _Tree, where: str) -> None:
    entry = index.get(name)
    if entry is None:
        raise ConfigError(f"{where}: lm-eval defines no task, group or tag {name!r} there")
    kind = entry.kind.name
    if kind == "TAG":
        for t in sorted(entry.tags):
            _collect(t, index, tree, where)
    elif kind == "GROUP":
        tree.others.add(Path(entry.yaml_path))
        for child in entry.cfg.get("task") or []:
            if not isinstance(child, str):
                raise ConfigError(f"{entry.yaml_path}: group {name!r} defines a task inline; staging copies only "
                                  "tasks defined in their own YAML files")
            _collect(child, index, tree, where)
    elif kind == "TASK":
        path = Path(entry.yaml_path)
        tree.leaves[name] = path
        tree.others.update(_includes(path))
    else:
        raise ConfigError(f"{entry.yaml_path}: {name!r} is a Python-class task; only YAML tasks can be staged")


def _data_dir(bench: Benchmark, cfg: dict[str, Any], path: Path) -> str:
    if not bench.per_subset:
        return bench.data
    sub = cfg.get("dataset_name")
    if not sub:
        raise ConfigError(f"{path}: no dataset_name to name its data directory under {bench.data}/")
    return f"{bench.data}/{sub}"


def staged_config(bench: Benchmark, path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(the leaf YAML's own keys with the local-data overrides, {split: data file}) for one leaf task."""
    cfg = resolved(path)
    own = read_yaml(path)
    d = _data_dir(bench, cfg, path)
    splits = {k: v for k, v in cfg.items() if k in ("training_split", "fewshot_split") and v}
    clash = {k: v for k, v in splits.items() if v in STUDY_SPLITS.values()}
    if clash:  # its few-shot examples would come from the documents a study selects on or reports
        raise ConfigError(f"{path}: {clash} names a split that staging reserves for the study's validation/test "
                          "documents; stage this task by hand (docs/eval.md, 'Staging')")
    splits.update(STUDY_SPLITS)
    files = {s: f"{DATA_VAR}/{d}/{s}.jsonl" for s in dict.fromkeys(splits.values())}
    own.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files}, **splits)
    return own, files


def plan(tasks: Sequence[str] = DEFAULT_TASKS, tasks_dir: Path | None = None) -> dict[str, Any]:
    """{relative path: text or source Path} of every file to write, plus the manifest's content under None."""
    root = tasks_dir or lm_eval_tasks_dir()
    unknown = [t for t in tasks if t not in BENCHMARKS]
    if unknown or not tasks:
        raise ConfigError(f"lm-eval tasks {unknown or list(tasks)}: expected some of {sorted(BENCHMARKS)}")
    out: dict[Any, Any] = {}
    manifest: dict[str, Any] = {"lm_eval_version": _version(), "lm_eval_tasks_dir": str(root), "tasks": {}}
    by_source: dict[str, list[Benchmark]] = {}
    for t in dict.fromkeys(tasks):
        by_source.setdefault(BENCHMARKS[t].source, []).append(BENCHMARKS[t])
    for source, benches in by_source.items():
        src = root / source
        if not src.is_dir():
            raise ConfigError(f"{src}: not in this lm-eval install (staging expects lm-eval 0.4.x's task layout)")
        index = _index(src)
        for bench in benches:
            tree = _Tree()
            _collect(bench.name, index, tree, str(src))
            for p in sorted(tree.others):  # a task YAML included by another (truthfulqa_mc2 includes mc1's) is
                own = read_yaml(p)  # staged too, so no copied file still points at the hub
                if p.suffix == ".yaml" and isinstance(own.get("task"), str) and "group" not in own:
                    tree.leaves.setdefault(own["task"], p)
            leaves = {}
            for name, path in sorted(tree.leaves.items()):
                cfg, files = staged_config(bench, path)
                rel = path.relative_to(root).as_posix()
                out[rel] = (f"# lm-eval {_version()}'s tasks/{rel}, staged by `ptm evalset lm-eval-tasks`: the same "
                            "task reading local JSONL\n# files (dataset_path, dataset_name, dataset_kwargs and the "
                            "*_split keys are ptm's; docs/eval.md, 'Staging').\n"
                            + _yaml().dump(cfg, Dumper=_dumper(), sort_keys=False, allow_unicode=True, width=120))
                leaves[name] = files
            for p in tree.others:
                out.setdefault(p.relative_to(root).as_posix(), p)
            for py in {p.parent for p in [*tree.leaves.values(), *tree.others]}:
                for m in sorted(py.glob("*.py")):
                    if not m.name.startswith("_"):  # utils.py etc.; not lm-eval's _generate_configs.py
                        out.setdefault(m.relative_to(root).as_posix(), m)
            manifest["tasks"][bench.name] = leaves
    out[None] = manifest
    return out


def replace_dir(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished `tmp` to `out` (an existing `out` only with force: renamed away first, then deleted)."""
    if out.exists() and not force:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"{out}: already exists (use --force to replace it)")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(out: Path) -> Path:
    """A fresh directory next to `out` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def write_task_yamls(out: str | os.PathLike, tasks: Iterable[str] = DEFAULT_TASKS, *, force: bool = False,
                     tasks_dir: Path | None = None) -> dict[str, dict[str, dict[str, str]]]:
    """Write the staged task YAMLs of `tasks` to the directory `out` (whole, or nothing: built next to it and
    renamed into place). Returns {benchmark: {leaf task: {split: data file}}} (also in out/ptm_lm_eval_tasks.json)."""
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out}: already exists (use --force to replace it)")
    files = plan(list(tasks), tasks_dir)
    manifest = files.pop(None)
    tmp = staging_dir(out)
    try:
        for rel, content in sorted(files.items()):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, dst)
            else:
                dst.write_text(content)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out, force)
    return manifest["tasks"]
