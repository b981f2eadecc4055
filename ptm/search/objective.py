"""Search objectives: a weighted macro-average of named eval tasks, parsed from the CLI or TOML."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ptm.errors import ConfigError


@dataclass(frozen=True)
class Objective:
    """Weighted macro-average of named tasks: sum_t w_t score_t / sum_t w_t."""

    weights: dict[str, float]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.weights:
            raise ConfigError("an objective needs at least one task")
        bad = {t: w for t, w in self.weights.items() if not (isinstance(w, int | float) and w > 0)}
        if bad:
            raise ConfigError(f"objective task weights must be positive numbers, got {bad}")

    @property
    def label(self) -> str:
        return self.name or "+".join(self.weights)

    def __call__(self, scores: dict[str, float]) -> float:
        total = math.fsum(self.weights.values())
        return math.fsum(w * float(scores[t]) for t, w in self.weights.items()) / total


def parse_objective(spec: str | dict[str, float] | list[str], name: str = "") -> Objective:
    """'copy:1,science:2' | ['copy', 'science'] | {'copy': 1.0} -> Objective."""
    if isinstance(spec, dict):
        return Objective({str(k): float(v) for k, v in spec.items()}, name)
    parts = spec if isinstance(spec, list) else [p for p in str(spec).split(",") if p.strip()]
    out: dict[str, float] = {}
    for p in parts:
        task, _, w = str(p).strip().partition(":")
        try:
            out[task.strip()] = float(w) if w else 1.0
        except ValueError as e:
            raise ConfigError(f"objective {spec!r}: bad weight in {p!r} (expected task[:weight])") from e
    return Objective(out, name)


def check_tasks(objectives: Sequence[Objective], available: dict[str, bool], where: str) -> None:
    """Every task named by an objective exists in the eval set and is higher-is-better."""
    problems = []
    for o in objectives:
        for t in o.weights:
            if t not in available:
                problems.append(f"objective {o.label!r} names unknown task {t!r}")
            elif not available[t]:
                problems.append(f"objective {o.label!r}: task {t!r} is lower-is-better (perplexity); "
                                "use bounded scores")
    if problems:
        known = ", ".join(sorted(available))
        raise ConfigError(f"{where}: " + "; ".join(problems) + f" (tasks there: {known})")

