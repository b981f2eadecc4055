"""`SearchConfig`: every setting of a search study, from TOML (configs/search/*.toml) and CLI overrides."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ptm.errors import ConfigError
from ptm.search.objective import Objective, parse_objective
from ptm.search.space import Space
from ptm.toml_file import load_toml


@dataclass
class SearchConfig:
    pool: list[str] = field(default_factory=list)
    base: str | None = None
    val: str | None = None
    test: str | None = None
    objectives: list[Objective] = field(default_factory=list)
    space: str = "simplex"
    parametrisation: str = "softmax"
    layer_groups: int = 0
    tv_bounds: tuple[float, float] = (-0.5, 1.5)
    budget_evals: int | None = 40
    budget_seconds: float | None = None
    seed: int = 0
    sigma: float | None = None
    popsize: int | None = None
    pareto_points: int = 5
    baselines: bool = True
    baseline_scales: list[float] = field(default_factory=lambda: [0.2, 0.35, 0.5, 1.0])
    ties_density: float = 0.5
    dare_drop_rate: float = 0.3
    eval_batch_size: int = 64
    max_new_tokens: int = 48
    max_items_per_task: int | None = None
    # [mesh] table: data/fsdp/tensor sizes (-1 = the remaining devices) of the one global mesh the pool and the
    # evaluation use; None = no mesh for one process, data=1 x fsdp=all devices on several processes.
    mesh: dict[str, int] | None = None

    def mesh_config(self):
        from ptm.parallel.mesh import MeshConfig

        if self.mesh is None:
            return MeshConfig(data=1, fsdp=-1, tensor=1)
        bad = set(self.mesh) - {"data", "fsdp", "tensor"}
        if bad:
            raise ConfigError(f"[mesh]: unknown key(s) {sorted(bad)} (known: data, fsdp, tensor)")
        try:
            return MeshConfig(**{k: int(v) for k, v in self.mesh.items()})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[mesh]: {e}") from e

    @classmethod
    def from_toml(cls, path: str) -> SearchConfig:
        d = load_toml(path, "search config")
        return cls.from_dict(d, where=path)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "search config") -> SearchConfig:
        known = {f for f in cls.__dataclass_fields__} | {"objective"}
        bad = set(d) - known
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {sorted(bad)} (known: {sorted(known)})")
        d = dict(d)
        objs = d.pop("objectives", None)
        one = d.pop("objective", None)
        if objs is None and one is not None:
            objs = [one]
        parsed = []
        for i, o in enumerate(objs or []):
            if isinstance(o, dict) and "tasks" in o:
                parsed.append(parse_objective(o["tasks"], str(o.get("name", ""))))
            else:
                parsed.append(parse_objective(o, f"objective{i}" if len(objs) > 1 else ""))
        if isinstance(d.get("pool"), str):
            d["pool"] = [d["pool"]]
        if "tv_bounds" in d:
            d["tv_bounds"] = tuple(d["tv_bounds"])
        try:
            return cls(objectives=parsed, **d)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from e

    def with_overrides(self, **kw: Any) -> SearchConfig:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def validate(self) -> None:
        if not self.pool:
            raise ConfigError("no pool given (--pool or `pool` in the config)")
        if not self.val or not self.test:
            raise ConfigError("give validation (--val) and test (--test) eval sets; the test split is never "
                              "searched on")
        if not self.objectives:
            raise ConfigError("no objective given (--objective 'task[:w],...')")
        if len(self.objectives) > 3:
            raise ConfigError(f"Pareto mode takes 2 or 3 objectives, got {len(self.objectives)}")
        if self.budget_evals is not None and self.budget_evals < 1:
            raise ConfigError(f"budget_evals must be >= 1, got {self.budget_evals}")
        if self.budget_seconds is not None and self.budget_seconds <= 0:
            raise ConfigError(f"budget_seconds must be > 0, got {self.budget_seconds}")
        if self.budget_evals is None and self.budget_seconds is None:
            raise ConfigError("give a budget (budget_evals or budget_seconds)")
        if self.space == "task_vector" and not self.base:
            raise ConfigError("space 'task_vector' needs a base checkpoint (--base)")
        if len(self.objectives) > 1 and self.pareto_points < 2:
            raise ConfigError(f"pareto_points must be >= 2, got {self.pareto_points}")

    def header(self) -> dict[str, Any]:
        """What must not change across a resume (budgets may grow)."""
        d = asdict(self)
        for k in ("budget_evals", "budget_seconds", "eval_batch_size", "mesh"):
            d.pop(k)
        d["objectives"] = [{"name": o.name, "weights": o.weights} for o in self.objectives]
        d["tv_bounds"] = list(self.tv_bounds)
        return json.loads(json.dumps(d))

    def make_space(self, n: int) -> Space:
        return Space(n=n, kind=self.space, parametrisation=self.parametrisation,
                     layer_groups=self.layer_groups, bounds=self.tv_bounds)

