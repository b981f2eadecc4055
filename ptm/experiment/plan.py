"""What a study consists of, decided from its config alone: the training runs and the models to evaluate.

`plan_runs` lists every training run in the order it is trained; `plan_models` every model that is evaluated
(checkpoints and in-memory merges) given the heuristic omegas. The runner executes the plan; the analysis reads
results through the `Study` protocol, so neither imports the other's internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Protocol

from ptm.experiment import costs as C
from ptm.experiment.config import ExperimentConfig, Hyper


class RunPaths(Protocol):
    """Where a study's checkpoints live."""

    @property
    def pre_path(self) -> str: ...

    @property
    def general_path(self) -> str: ...

    def run_dir(self, rid: str) -> str: ...


class Study(RunPaths, Protocol):
    """What the analysis reads of a study that has run (ptm.experiment.runner.Experiment provides it)."""

    cfg: ExperimentConfig
    run_costs: dict[str, C.RunCost]
    models: dict[str, ModelSpec]
    scores: dict[str, dict[str, dict[str, Any]]]
    heuristics: dict[str, float]


# ---------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Source:
    path: str
    name: str
    max_examples: int | None = None


@dataclass(frozen=True)
class RunSpec:
    id: str
    kind: str  # pretrain | general | skill | cft | rt
    sources: tuple[Source, ...]
    init: str | None  # a run id ("@pre", "@general") or a checkpoint path, or None
    hyper: Hyper
    skill: str | None = None
    size: int | None = None


def plan_runs(cfg: ExperimentConfig) -> list[RunSpec]:
    """Every training run of the study, in the order they are trained."""
    k = cfg.train.kinds
    runs: list[RunSpec] = []
    if cfg.base.pretrain:
        runs.append(
            RunSpec(
                "pre",
                "pretrain",
                (Source(cfg.base.data, "pretrain", cfg.base.examples),),
                None,
                k["pretrain"],
            )
        )
    pre_init = "@pre" if cfg.base.pretrain else cfg.base.checkpoint
    g_src = Source(cfg.general.data, "general", cfg.general.examples)
    if cfg.general.checkpoint is None:
        runs.append(RunSpec("general", "general", (g_src,), pre_init, k["general"]))
    g_init = "@general" if cfg.general.checkpoint is None else cfg.general.checkpoint
    for s in cfg.skills:
        runs.append(
            RunSpec(
                f"skill_{s.name}",
                "skill",
                (Source(s.data, s.name, s.examples),),
                pre_init,
                k["skill"],
                s.name,
                s.examples,
            )
        )
    for s in cfg.skills:
        for n in s.sizes:
            runs.append(
                RunSpec(f"cft_{s.name}_{n}", "cft", (Source(s.data, s.name, n),), g_init, k["cft"], s.name, n)
            )
        w = wise_ft_run(cfg, s.name)
        if "wise_ft" in cfg.merge.methods and w not in {r.id for r in runs}:
            runs.append(
                RunSpec(w, "cft", (Source(s.data, s.name, s.examples),), g_init, k["cft"], s.name, s.examples)
            )
    for s in cfg.skills:
        for n in s.sizes:
            runs.append(
                RunSpec(
                    f"rt_{s.name}_{n}", "rt", (g_src, Source(s.data, s.name, n)), pre_init, k["rt"], s.name, n
                )
            )
    every = tuple(Source(s.data, s.name, s.examples) for s in cfg.skills)
    if cfg.baselines.cft_all:
        runs.append(RunSpec("cft_all", "cft", every, g_init, k["cft"]))
    if cfg.baselines.rt_all:
        runs.append(RunSpec("rt_all", "rt", (g_src, *every), pre_init, k["rt"]))
    return runs


def wise_ft_run(cfg: ExperimentConfig, skill: str) -> str:
    """theta_CFT of WiSE-FT: CFT on the whole D (reuses the CFT grid run of that size when there is one)."""
    s = cfg.skill(skill)
    if s.examples is not None and s.examples in s.sizes:
        return f"cft_{skill}_{s.examples}"
    return f"cft_{skill}_full"


# ---------------------------------------------------------------------------------------- models


@dataclass
class ModelSpec:
    id: str
    group: str  # pre | general | skill_only | cft | rt | ptm | multi | pairwise | cft_all | rt_all
    skill: str | None = None  # single-skill models
    skills: tuple[str, ...] = ()  # multi-skill / pairwise merges
    method: str | None = None
    omega: float | list[float] | None = None
    heuristic: bool = False
    size: int | None = None
    run: str | None = None  # checkpoint-backed: run id or path
    recipe: dict[str, Any] | None = None  # merge-backed: ptm.merge.recipe.Recipe fields

    def label(self) -> str:
        return self.id


def _fmt_w(w: float) -> str:
    return f"{w:.4g}"


def plan_models(cfg: ExperimentConfig, paths: RunPaths, heuristics: dict[str, float]) -> dict[str, ModelSpec]:
    """Every model of the study that is evaluated on validation (test follows selection), by id."""
    M: dict[str, ModelSpec] = {}
    pre, gen = paths.pre_path, paths.general_path
    M["pre"] = ModelSpec("pre", "pre", run=pre)
    M["general"] = ModelSpec("general", "general", run=gen)
    for s in cfg.skills:
        M[f"skill_only_{s.name}"] = ModelSpec(
            f"skill_only_{s.name}", "skill_only", skill=s.name, run=paths.run_dir(f"skill_{s.name}")
        )
        for n in s.sizes:
            M[f"cft_{s.name}_{n}"] = ModelSpec(
                f"cft_{s.name}_{n}", "cft", skill=s.name, size=n, run=paths.run_dir(f"cft_{s.name}_{n}")
            )
            M[f"rt_{s.name}_{n}"] = ModelSpec(
                f"rt_{s.name}_{n}", "rt", skill=s.name, size=n, run=paths.run_dir(f"rt_{s.name}_{n}")
            )
    for s in cfg.skills:
        omegas = list(cfg.merge.omegas) + ([heuristics[s.name]] if cfg.merge.heuristic else [])
        for method in cfg.merge.methods:
            for j, w in enumerate(omegas):
                heur = cfg.merge.heuristic and j == len(omegas) - 1
                mid = f"ptm_{method}_{s.name}_" + ("heuristic" if heur else f"w{_fmt_w(w)}")
                M[mid] = ModelSpec(
                    mid,
                    "ptm",
                    skill=s.name,
                    method=method,
                    omega=w,
                    heuristic=heur,
                    recipe=recipe_for(cfg, paths, method, [s.name], [w]),
                )
    if cfg.baselines.cft_all:
        M["cft_all"] = ModelSpec(
            "cft_all", "cft_all", skills=tuple(x.name for x in cfg.skills), run=paths.run_dir("cft_all")
        )
    if cfg.baselines.rt_all:
        M["rt_all"] = ModelSpec(
            "rt_all", "rt_all", skills=tuple(x.name for x in cfg.skills), run=paths.run_dir("rt_all")
        )
    names = [s.name for s in cfg.skills]
    if cfg.merge.multi_skill and len(names) > 1:
        for method in cfg.merge.multi_methods:
            w = [heuristics[k] for k in names]
            mid = f"multi_{method}_heuristic"
            M[mid] = ModelSpec(
                mid,
                "multi",
                skills=tuple(names),
                method=method,
                omega=w,
                heuristic=True,
                recipe=recipe_for(cfg, paths, method, names, w),
            )
    if cfg.merge.pairwise and len(names) > 2:
        for a, b in combinations(names, 2):
            w = [heuristics[a], heuristics[b]]
            mid = f"pair_{a}+{b}"
            M[mid] = ModelSpec(
                mid,
                "pairwise",
                skills=(a, b),
                method="task_arithmetic",
                omega=w,
                heuristic=True,
                recipe=recipe_for(cfg, paths, "task_arithmetic", [a, b], w),
            )
    return M

def recipe_for(cfg: ExperimentConfig, paths: RunPaths, method: str, skills: Sequence[str],
               weights: Sequence[float]) -> dict[str, Any]:
    """The merge recipe (ptm.merge.recipe.Recipe fields) of a PTM / multi-skill model."""
    pre, gen = paths.pre_path, paths.general_path
    skill_dirs = [paths.run_dir(f"skill_{k}") for k in skills]
    if method == "wise_ft":
        return {
            "method": "wise_ft",
            "inputs": {"general": gen, "cft": paths.run_dir(wise_ft_run(cfg, skills[0]))},
            "weights": float(weights[0]),
        }
    if method == "linear_interpolation":
        return {
            "method": method,
            "inputs": {"pre": pre, "general": gen, "skills": skill_dirs},
            "weights": float(weights[0]),
        }
    rec = {
        "method": method,
        "inputs": {"pre": pre, "general": gen, "skills": skill_dirs},
        "weights": [float(w) for w in weights],
    }
    if method == "ties":
        rec["density"] = cfg.merge.density
    if method == "dare":
        rec["drop_rate"] = cfg.merge.drop_rate
    return rec
