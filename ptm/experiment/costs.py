"""Training cost as the paper counts it (Sections 2.1-2.3), in dataset examples and in optimizer steps.

- CFT tries several sizes D_i from theta_G: sum_i |D_i| (every trial counts, not just the best one);
- RT retrains theta_pre on G + D_i for each size: n |G| + sum_i |D_i|;
- PTM trains once on the whole D (omega is tuned by merging, which costs no training): |D|;
  WiSE-FT's theta_CFT is one CFT run on the whole D: |D|; several skills merged: sum_k |D_k|.
theta_G (and theta_pre) are shared by every method and not counted. Measured costs are sums over the runs each
method used (`RunCost` from each run's run.json), so they also give the optimizer steps the formula cannot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ptm.errors import ConfigError


@dataclass(frozen=True)
class RunCost:
    examples: int  # distinct training examples (|D_i|, or |G| + |D_i| for RT)
    examples_seen: int  # example visits over all epochs
    steps: int  # optimizer steps

    @classmethod
    def from_run_json(cls, d: Mapping[str, Any], where: str = "run.json") -> RunCost:
        data = d.get("data") or {}
        try:
            return cls(int(data["train_examples"]), int(data["examples_seen"]), int(d["steps"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: no usable data.train_examples / examples_seen / steps ({e})") from e


@dataclass
class Cost:
    examples: int = 0
    examples_seen: int = 0
    steps: int = 0
    runs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def total(runs: Mapping[str, RunCost], ids: Iterable[str]) -> Cost:
    """Sum of the costs of runs `ids` (each counted once even if listed twice)."""
    out = Cost()
    for rid in dict.fromkeys(ids):
        if rid not in runs:
            raise ConfigError(f"cost of run {rid!r} requested but it has no recorded cost")
        r = runs[rid]
        out.examples += r.examples
        out.examples_seen += r.examples_seen
        out.steps += r.steps
        out.runs.append(rid)
    return out


# ---------------------------------------------------------------------------------------- paper formulas


def cft_examples(sizes: Sequence[int]) -> int:
    """CFT: sum_i |D_i|."""
    return int(sum(sizes))


def rt_trials(sizes: Sequence[int]) -> int:
    """The paper's n: RT retrains theta_pre on G + D_i once per data-ratio trial, i.e. once per size D_i (its
    five sizes give n = 5). The measured cost sums exactly these runs, so n is the length of the D_i grid."""
    return len(sizes)


def rt_examples(general: int, sizes: Sequence[int]) -> int:
    """RT: n |G| + sum_i |D_i| for n = rt_trials(sizes) retraining runs."""
    return int(rt_trials(sizes) * general + sum(sizes))


def ptm_examples(skill: int | Sequence[int]) -> int:
    """PTM: |D| (one skill run), or sum_k |D_k| when several skills are merged."""
    return int(skill) if isinstance(skill, int) else int(sum(skill))


# ---------------------------------------------------------------------------------------- per method


def method_runs(skill: str, sizes: Sequence[int], wise_ft_run: str | None, methods: Sequence[str]) -> dict:
    """Which runs each method of one skill pays for (run ids as the runner names them)."""
    out = {"cft": [f"cft_{skill}_{n}" for n in sizes], "rt": [f"rt_{skill}_{n}" for n in sizes]}
    for m in methods:
        if m in ("task_arithmetic", "linear_interpolation"):
            out[m] = [f"skill_{skill}"]
        elif m == "wise_ft":
            out[m] = [wise_ft_run] if wise_ft_run else []
    return out


def method_costs(runs: Mapping[str, RunCost], plan: Mapping[str, Sequence[str]]) -> dict[str, Cost]:
    return {m: total(runs, ids) for m, ids in plan.items()}
