"""CMA-ES merge search ("If You Can't Use Them, Recycle Them", arXiv 2412.04144).

Given a pool of N checkpoints, find the weights of a linear merge that maximise a weighted macro-average of
validation task scores. Pieces, each usable alone:

- `Space`: maps an unconstrained CMA-ES vector x to merge weights — simplex weights over the pool (softmax of
  logits, see docs/search.md for why) or unnormalised task-vector weights over a base, optionally one weight
  vector per layer group.
- `cma_search`: the ask/tell loop over a plain Python objective `f(weights) -> value | (value, info)`, with
  a JSONL log that doubles as the resume state (a resumed search replays the log through the same seeded
  CMA-ES).
- `Pool`: the checkpoints stacked per tensor ([N, ...]) and kept resident on the devices (sharded over a mesh
  when given); `Pool.merge(weights)` is one jitted weighted sum, bit-identical to `ptm merge` writing the
  same recipe.
- `run`: the whole study — baselines, search (or Pareto sweep), best merge written once through the engine,
  test scores, summary.json and plots.
"""

from __future__ import annotations

import glob as _glob
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ptm.ckpt.tree import flatten, nest
from ptm.errors import CheckpointError, ConfigError, MergeError
from ptm.toml_file import load_toml

LOG_NAME = "search_log.jsonl"
LOG_VERSION = 1
NONTRIVIAL = 0.05  # a pool member "counts" in a simplex merge when its weight is at least this

# ----------------------------------------------------------------------------------------------- objectives


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


# ----------------------------------------------------------------------------------------------- search space


def softmax_simplex(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64: every row is strictly positive and sums to 1 (up to rounding)."""
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def abs_simplex(x: np.ndarray) -> np.ndarray:
    """|x| / sum |x| row-wise (exact zeros reachable; all-zero rows map to uniform)."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    s = a.sum(axis=-1, keepdims=True)
    n = a.shape[-1]
    return np.where(s > 0, a / np.where(s > 0, s, 1), 1.0 / n)


PARAMETRISATIONS = {"softmax": softmax_simplex, "abs": abs_simplex}


@dataclass(frozen=True)
class Space:
    """How a CMA-ES vector x (length groups * n) becomes a weight matrix [groups, n].

    kind "simplex": each row on the probability simplex via `parametrisation`; merge = sum_i w_i theta_i.
    kind "task_vector": rows are raw weights (CMA-ES box bounds [lo, hi]);
    merge = base + sum_i w_i (theta_i - base).
    groups = 1 (one weight per checkpoint) or layer_groups + 1: contiguous blocks of layers, then one group
    for every tensor outside `layers.*` (embeddings, final norm, lm_head).
    """

    n: int
    kind: str = "simplex"
    parametrisation: str = "softmax"
    layer_groups: int = 0
    bounds: tuple[float, float] = (-0.5, 1.5)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError("the pool is empty")
        if self.kind not in ("simplex", "task_vector"):
            raise ConfigError(f"search space {self.kind!r}: use 'simplex' or 'task_vector'")
        if self.parametrisation not in PARAMETRISATIONS:
            raise ConfigError(f"parametrisation {self.parametrisation!r}: "
                              f"use one of {sorted(PARAMETRISATIONS)}")
        if self.layer_groups < 0:
            raise ConfigError(f"layer_groups must be >= 0, got {self.layer_groups}")

    @property
    def groups(self) -> int:
        return 1 if self.layer_groups == 0 else self.layer_groups + 1

    @property
    def dim(self) -> int:
        return self.groups * self.n

    def weights(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(self.groups, self.n)
        if self.kind == "simplex":
            return PARAMETRISATIONS[self.parametrisation](x)
        return x.copy()

    def x0(self) -> np.ndarray:
        """Start at the uniform soup: logits 0 (softmax), all ones (abs), or 1/n task-vector weights."""
        if self.kind == "task_vector":
            return np.full(self.dim, 1.0 / self.n)
        return np.zeros(self.dim) if self.parametrisation == "softmax" else np.ones(self.dim)

    def default_sigma(self) -> float:
        if self.kind == "task_vector":
            return 0.3
        return 1.0 if self.parametrisation == "softmax" else 0.5

    def cma_bounds(self) -> np.ndarray | None:
        if self.kind != "task_vector":
            return None
        return np.tile(np.array(self.bounds, dtype=np.float64), (self.dim, 1))

    def layer_group_of(self, n_layers: int) -> np.ndarray:
        """Group index of each layer (contiguous, as equal as possible)."""
        if self.layer_groups == 0:
            return np.zeros(n_layers, dtype=np.int64)
        if self.layer_groups > max(n_layers, 1):
            raise ConfigError(f"layer_groups={self.layer_groups} exceeds the model's {n_layers} layers")
        blocks = np.array_split(np.arange(n_layers), self.layer_groups)
        return np.concatenate([np.full(len(a), g) for g, a in enumerate(blocks)]).astype(np.int64)

    @property
    def other_group(self) -> int:
        return self.groups - 1


# ----------------------------------------------------------------------------------------------- log + loop


class SearchLog:
    """Append-only JSONL: one header, then one record per evaluated candidate or baseline.

    It is the resume state: records are keyed by run (a Pareto point or "main") and order, a killed writer's
    partial last line is dropped, and the header must match the resumed search's config.
    """

    def __init__(self, path: str | None, header: dict[str, Any] | None = None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path is None:
            return
        if os.path.exists(path):
            good, lines = 0, open(path, "rb").read().split(b"\n")
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    self.records.append(json.loads(line))
                    good += len(line) + 1
                except json.JSONDecodeError as e:
                    if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1:]):
                        raise ConfigError(f"{path}:{i + 1}: corrupt search log line ({e})") from e
                    break  # torn last line of a killed search
            with open(path, "r+b") as f:
                f.truncate(min(good, os.path.getsize(path)))
        if header is not None:
            if self.records:
                old = self.records[0]
                if old.get("type") != "header" or old.get("config") != header:
                    diff = sorted(k for k in set(header) | set(old.get("config", {}))
                                  if header.get(k) != old.get("config", {}).get(k))
                    raise ConfigError(f"{path}: the log belongs to a different search (differs in {diff}); "
                                      "use a new output dir")
            else:
                self.append({"type": "header", "version": LOG_VERSION, "config": header})

    def append(self, rec: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.records.append(rec)

    def of(self, type_: str, run: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == type_ and (run is None or r.get("run") == run)]


@dataclass
class SearchResult:
    run: str
    best_x: list[float]
    best_weights: list[list[float]]
    best_value: float
    best_info: dict[str, Any]
    evaluations: int
    replayed: int
    generations: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _as_value(r: Any) -> tuple[float, dict[str, Any]]:
    if isinstance(r, tuple):
        v, info = r
        return float(v), dict(info)
    return float(r), {}


def cma_search(f: Callable[[np.ndarray], Any], space: Space, *, budget_evals: int | None = None,
               budget_seconds: float | None = None, seed: int = 0, sigma: float | None = None,
               popsize: int | None = None, log: SearchLog | None = None, run: str = "main",
               progress: bool = False) -> SearchResult:
    """Maximise f(weights) with CMA-ES over `space`; weights is the [groups, n] matrix of `space.weights(x)`.

    Resume: logged candidates of `run` are replayed — the same seeded CMA-ES asks again, each asked x must
    equal the logged one (else the log is from another search) and is told the logged value without
    evaluating f.
    The seconds budget counts the logged candidates' evaluation time too.
    """
    from cmaes import CMA

    if budget_evals is None and budget_seconds is None:
        raise ConfigError("give a budget: evaluations or seconds")
    if budget_evals is not None and budget_evals < 1:
        raise ConfigError(f"budget of evaluations must be >= 1, got {budget_evals}")
    if budget_seconds is not None and budget_seconds <= 0:
        raise ConfigError(f"budget of seconds must be > 0, got {budget_seconds}")
    log = log if log is not None else SearchLog(None)
    logged = log.of("candidate", run)
    opt = CMA(mean=space.x0(), sigma=float(sigma or space.default_sigma()), bounds=space.cma_bounds(),
              seed=seed, population_size=popsize)
    t0 = time.perf_counter()
    spent = 0.0
    hist: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    n = replayed = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=budget_evals, desc=f"search {run}", unit="cand", file=sys.stderr)

    def out_of_budget() -> bool:
        return ((budget_evals is not None and n >= budget_evals)
                or (budget_seconds is not None and spent >= budget_seconds))

    while not out_of_budget():
        told = []
        for k in range(opt.population_size):
            if out_of_budget():
                break
            x = opt.ask()
            if n < len(logged):
                rec = logged[n]
                same = (rec["gen"], rec["k"]) == (opt.generation, k) and np.array_equal(rec["x"], x)
                if not same:
                    raise ConfigError(f"{log.path}: logged candidate {n} of run {run!r} is not what this "
                                      "search asks (different seed, pool or space?); use a new output dir")
                value, info, dt = float(rec["value"]), rec.get("info", {}), float(rec["seconds"])
                replayed += 1
            else:
                w = space.weights(x)
                t1 = time.perf_counter()
                value, info = _as_value(f(w))
                dt = time.perf_counter() - t1
                rec = {"type": "candidate", "run": run, "gen": opt.generation, "k": k, "x": x.tolist(),
                       "weights": w.tolist(), "value": value, "info": info, "seconds": dt}
                log.append(rec)
            spent += dt
            n += 1
            told.append((x, -value if math.isfinite(value) else 1e30))
            entry = {"eval": n, "gen": rec["gen"], "value": value, "weights": rec["weights"]}
            hist.append(entry)
            if best is None or value > best["value"]:
                best = {**entry, "x": rec["x"], "info": info}
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"best {best['value']:.4f}", refresh=False)
        if len(told) < opt.population_size:
            break  # budget ran out mid-generation; CMA-ES needs a full population to update
        opt.tell(told)
        if opt.should_stop():
            break
    if bar is not None:
        bar.close()
    assert best is not None
    return SearchResult(run=run, best_x=best["x"], best_weights=best["weights"], best_value=best["value"],
                        best_info=best["info"], evaluations=n, replayed=replayed, generations=opt.generation,
                        seconds=time.perf_counter() - t0, history=hist)


# ----------------------------------------------------------------------------------------------- the pool


def expand_paths(specs: Sequence[str]) -> list[str]:
    """Paths or globs (local or gs://) -> checkpoint paths, in order, globs sorted; a glob matching nothing
    is an error."""
    out: list[str] = []
    for s in specs:
        if not any(c in s for c in "*?["):
            out.append(s)
            continue
        if s.startswith("gs://"):
            import gcsfs

            fs = gcsfs.GCSFileSystem()
            hits = sorted("gs://" + h for h in fs.glob(s[5:]))
        else:
            hits = sorted(_glob.glob(s))
        if not hits:
            raise CheckpointError(f"pool glob {s!r} matches nothing")
        out.extend(hits)
    seen = set()
    dup = [p for p in out if p in seen or seen.add(p)]
    if dup:
        raise ConfigError(f"pool lists the same checkpoint twice: {dup}")
    return out


class Pool:
    """The pool's tensors stacked as [M, ...] jax Arrays, resident for the whole search.

    Rows 0..n-1 are the members; row n is the base when one is given (task-vector spaces). With a mesh each
    stacked tensor is sharded like the model's parameter (the member axis replicated), so a candidate merge is
    computed shard-locally with no communication.
    """

    def __init__(self, members: Sequence[str], base: str | None = None, mesh=None):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

        from ptm.ckpt import stores as S
        from ptm.merge import engine

        self.members = expand_paths(list(members))
        if not self.members:
            raise ConfigError("the pool is empty")
        self.base = base
        self.mesh = mesh
        paths = self.members + ([base] if base else [])
        stores, problems = [], []
        for p in paths:
            try:
                stores.append(S.open_store(p))
            except Exception as e:  # PtmError or an unreadable file: collect all before failing
                problems.append(f"{p}: {e}")
        if problems:
            raise CheckpointError(f"cannot open {len(problems)} pool checkpoint(s):\n  "
                                  + "\n  ".join(problems))
        self.infos = engine.check_compatible(stores)
        models = [(s.path, (s.meta or {}).get("model")) for s in stores]
        cfgs = {json.dumps(_shape_of(m), sort_keys=True) for _, m in models if m}
        if len(cfgs) > 1:
            lines = [f"{p}: {json.dumps(_shape_of(m), sort_keys=True)}" for p, m in models if m]
            raise MergeError("pool members have different model shapes:\n  " + "\n  ".join(lines))
        self.model_dict = next((m for _, m in models if m), None)
        toks = [(s.meta or {}).get("tokenizer") for s in stores]
        self.tokenizer = next((t for t in toks if t), None) or "byte"
        self.n = len(self.members)
        self.n_layers = engine.n_layers(self.infos)
        self.names = list(self.infos)
        self.shardings = self._shardings(mesh)
        dev = SingleDeviceSharding(jax.local_devices()[0])
        self.stacked: dict[str, Any] = {}
        for name, info in self.infos.items():
            full = tuple(slice(0, d) for d in info.shape)
            sh = self.shardings.get(name)
            ssh = NamedSharding(mesh, PartitionSpec(None, *sh.spec)) if sh is not None else dev

            def cb(idx, name=name, full=full):
                rows = range(*idx[0].indices(len(stores))) if idx else range(len(stores))
                sub = tuple(idx[1:]) + full[len(idx[1:]):]
                return np.stack([np.asarray(stores[r].read(name, sub)) for r in rows])

            self.stacked[name] = jax.make_array_from_callback((len(stores), *info.shape), ssh, cb)
        self._fns: dict[tuple, Callable] = {}

    def _shardings(self, mesh) -> dict[str, Any]:
        if mesh is None:
            return {}
        from ptm.merge import engine

        if self.model_dict:
            from ptm.model.config import ModelConfig
            from ptm.model.sharding import param_shardings

            try:
                flat = flatten(param_shardings(ModelConfig.from_dict(self.model_dict), mesh))
                if set(flat) == set(self.infos):
                    return flat
            except (TypeError, ValueError):
                pass
        return {n: engine.default_sharding(mesh, i.shape) for n, i in self.infos.items()}

    def bytes(self) -> int:
        one = sum(int(np.prod(i.shape)) * i.dtype.itemsize for i in self.infos.values())
        return one * (self.n + bool(self.base))

    def coefficient_fn(self, space: Space) -> Callable:
        """The jitted merge for `space`: (stacked pool, weights [groups, n] float32) -> flat dict of tensors.

        Same operation order as ptm.merge.methods (linear: 0 + w_0 x_0 + w_1 x_1 ...; task arithmetic:
        base + w_0 (x_0 - base) + ...), each step rounded to float32, so results match the engine bit for bit.
        """
        import jax
        import jax.numpy as jnp

        key = (space.kind, space.groups, space.layer_groups)
        if key in self._fns:
            return self._fns[key]
        if space.kind == "task_vector" and not self.base:
            raise ConfigError("a task_vector search space needs a base checkpoint (--base)")
        lg = space.layer_group_of(self.n_layers)
        other = space.other_group
        names, infos, n = self.names, self.infos, self.n

        def merge(stacked, w, zero):
            out = {}
            for name in names:
                x = stacked[name]
                info = infos[name]
                if name.startswith("layers.") and len(info.shape) > 0:
                    wt = w[jnp.asarray(lg)]  # [L, n]
                    coef = [wt[:, i].reshape((-1,) + (1,) * (len(info.shape) - 1)) for i in range(n)]
                else:
                    coef = [w[other, i] for i in range(n)]
                # Each product must be rounded to float32 on its own, as numpy does: XLA (CPU and GPU) would
                # contract multiply+add into an FMA and differ in the last bit. Routing the product through an
                # integer OR with a runtime zero is opaque to the compiler and costs one integer op.
                if space.kind == "simplex":
                    acc = jnp.zeros(info.shape, jnp.float32)
                    for i in range(n):
                        acc = acc + _rounded(coef[i] * x[i].astype(jnp.float32), zero)
                else:
                    base = x[n].astype(jnp.float32)
                    acc = base
                    for i in range(n):
                        acc = acc + _rounded(coef[i] * (x[i].astype(jnp.float32) - base), zero)
                out[name] = acc.astype(info.dtype)
            return out

        out_sh = {k: v for k, v in self.shardings.items()} if self.shardings else None
        fn = jax.jit(merge, out_shardings=out_sh)
        self._fns[key] = fn
        return fn

    def merge(self, weights: np.ndarray, space: Space) -> dict[str, Any]:
        """Candidate params (nested dict of jax Arrays) for weights [groups, n]; nothing is written."""
        w = np.asarray(weights, dtype=np.float64).reshape(space.groups, self.n).astype(np.float32)
        return nest(self.coefficient_fn(space)(self.stacked, w, np.uint32(0)))

    def member_params(self, i: int) -> dict[str, Any]:
        return nest({name: x[i] for name, x in self.stacked.items()})

    def recipe(self, weights: np.ndarray, space: Space, out: str):
        """The engine recipe that writes the same merge (per-layer schedules when layer groups are on)."""
        from ptm.merge.recipe import Recipe

        w = np.asarray(weights, dtype=np.float64).reshape(space.groups, self.n)
        if space.groups == 1:
            specs: list[Any] = [float(v) for v in w[0]]
        else:
            lg = space.layer_group_of(self.n_layers)
            specs = [{"layers": [float(w[g, i]) for g in lg], "default": float(w[space.other_group, i])}
                     for i in range(self.n)]
        if space.kind == "simplex":
            return Recipe(method="linear", inputs={"models": list(self.members)}, weights=specs, out=out,
                          name="search-best")
        return Recipe(method="task_arithmetic", inputs={"pre": self.base, "skills": list(self.members)},
                      weights=specs, out=out, name="search-best")


def _rounded(p, zero):
    import jax
    import jax.numpy as jnp

    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(p, jnp.uint32) | zero, jnp.float32)


def _shape_of(model: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
            "tie_embeddings")
    return {k: (model or {}).get(k) for k in keys}


# ----------------------------------------------------------------------------------------------- config


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
        for k in ("budget_evals", "budget_seconds", "eval_batch_size"):
            d.pop(k)
        d["objectives"] = [{"name": o.name, "weights": o.weights} for o in self.objectives]
        d["tv_bounds"] = list(self.tv_bounds)
        return json.loads(json.dumps(d))

    def make_space(self, n: int) -> Space:
        return Space(n=n, kind=self.space, parametrisation=self.parametrisation,
                     layer_groups=self.layer_groups, bounds=self.tv_bounds)


# ------------------------------------------------------------------------------------------- harness adapter


class Evaluator:
    """Scores params on the objective tasks of one eval split with ptm.eval (items loaded once)."""

    def __init__(self, files: str, tasks: set[str] | None, model_config, tokenizer, mesh, cfg: SearchConfig,
                 objectives: Sequence[Objective] = ()):
        from ptm.eval import scorers
        from ptm.eval.evalset import load_suite

        items = load_suite(files)
        avail = {it.task: scorers.get_scorer(it.scorer).higher_is_better for it in items}
        check_tasks(objectives, avail, str(files))
        if tasks is not None:
            items = [it for it in items if it.task in tasks]
        if cfg.max_items_per_task:
            kept: dict[str, int] = {}
            items = [it for it in items if kept.setdefault(it.task, 0) < cfg.max_items_per_task
                     and not kept.__setitem__(it.task, kept[it.task] + 1)]
        self.items, self.config, self.tokenizer = items, model_config, tokenizer
        self.mesh, self.cfg = mesh, cfg
        self.calls = 0

    def scores(self, params) -> dict[str, float]:
        from ptm.eval.harness import evaluate

        self.calls += 1
        r = evaluate(params, self.config, self.tokenizer, self.items, batch_size=self.cfg.eval_batch_size,
                     max_new_tokens=self.cfg.max_new_tokens, mesh=self.mesh, num_examples=0)
        return {t: float(v.score) for t, v in r.tasks.items()}


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of `points` (maximising every column); ties keep the first."""
    pts = np.asarray(points, dtype=np.float64)
    keep = []
    for i, p in enumerate(pts):
        dominated = np.any(np.all(pts >= p, axis=1) & np.any(pts > p, axis=1))
        dup = any(np.array_equal(pts[j], p) for j in keep)
        if not dominated and not dup:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def sweep_weights(k: int, points: int) -> list[tuple[float, ...]]:
    """Objective-weight vectors on the (k-1)-simplex lattice with `points` values per axis."""
    m = points - 1
    if k == 1:
        return [(1.0,)]
    out = []
    if k == 2:
        for a in range(m + 1):
            out.append((a / m, 1 - a / m))
    else:
        for a in range(m + 1):
            for b in range(m + 1 - a):
                out.append((a / m, b / m, (m - a - b) / m))
    return out


# ----------------------------------------------------------------------------------------------- the study


def _model_config(pool: Pool):
    from ptm.model.config import ModelConfig

    if not pool.model_dict:
        raise CheckpointError(f"{pool.members[0]}: no ptm/metadata with a model config; the search needs it "
                              "to evaluate candidates")
    return ModelConfig.from_dict(pool.model_dict)


def run(cfg: SearchConfig, out_dir: str, *, use_mesh: bool = False, progress: bool = True,
        log_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The full search study; resumable from `<out_dir>/search_log.jsonl`. Returns the summary dict."""
    from ptm.data.tokenizers import load_tokenizer
    from ptm.merge import engine
    from ptm.merge import recipe as R

    say = log_fn or (lambda s: print(s, file=sys.stderr, flush=True))
    cfg.validate()
    os.makedirs(out_dir, exist_ok=True)
    mesh = None
    if use_mesh:
        from ptm.parallel.mesh import MeshConfig, make_mesh

        mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    t_load = time.perf_counter()
    pool = Pool(cfg.pool, cfg.base, mesh)
    model_config = _model_config(pool)
    tok = load_tokenizer(pool.tokenizer)
    space = cfg.make_space(pool.n)
    pool.coefficient_fn(space)  # fail early on a bad space (e.g. more layer groups than layers)
    say(f"ptm search: pool of {pool.n} checkpoint(s){' + base' if pool.base else ''}, "
        f"{pool.bytes() / 2**20:.1f} MiB resident, loaded in {time.perf_counter() - t_load:.1f} s; "
        f"space {space.kind}/{space.parametrisation}, {space.dim} dims")
    tasks = {t for o in cfg.objectives for t in o.weights}
    val = Evaluator(cfg.val, tasks, model_config, tok, mesh, cfg, cfg.objectives)
    test = Evaluator(cfg.test, tasks, model_config, tok, mesh, cfg, cfg.objectives)
    header = {**cfg.header(), "pool": pool.members, "base": pool.base}
    log = SearchLog(os.path.join(out_dir, LOG_NAME), header)
    objs = cfg.objectives
    primary = objs[0] if len(objs) == 1 else Objective({t: 1.0 for t in sorted(tasks)}, "mean")

    def scored(params) -> dict[str, Any]:
        s = val.scores(params)
        return {"scores": s, "objectives": [o(s) for o in objs]}

    # --- baselines (validation), logged so a resumed search does not redo them
    done = {r["name"]: r for r in log.of("baseline")}

    def baseline(name: str, make: Callable[[], Any], extra: dict[str, Any]) -> dict[str, Any]:
        if name not in done:
            t1 = time.perf_counter()
            info = scored(make())
            done[name] = {"type": "baseline", "name": name, **extra, **info, "value": primary(info["scores"]),
                          "seconds": time.perf_counter() - t1}
            log.append(done[name])
        return done[name]

    uniform = np.full((space.groups, pool.n), 1.0 / pool.n)
    simplex = Space(n=pool.n)
    baseline("uniform_soup", lambda: pool.merge(uniform[:1], simplex), {"weights": uniform[0].tolist()})
    for i, m in enumerate(pool.members):
        baseline(f"member[{i}]", lambda i=i: pool.member_params(i), {"path": m})
    store_cache: dict[str, Any] = {}
    engine_recipes: dict[str, R.Recipe] = {}
    if cfg.baselines and pool.base:
        for lam in cfg.baseline_scales:
            engine_recipes[f"task_arithmetic(scale={lam})"] = R.Recipe(
                method="task_arithmetic", inputs={"pre": pool.base, "skills": pool.members},
                weights=[lam] * pool.n)
            engine_recipes[f"dare(scale={lam},p={cfg.dare_drop_rate})"] = R.Recipe(
                method="dare", inputs={"pre": pool.base, "skills": pool.members}, weights=[lam] * pool.n,
                drop_rate=cfg.dare_drop_rate, seed=cfg.seed)
        engine_recipes[f"ties(density={cfg.ties_density})"] = R.Recipe(
            method="ties", inputs={"pre": pool.base, "skills": pool.members}, weights=[1.0] * pool.n,
            density=cfg.ties_density)
        for name, rec in engine_recipes.items():
            baseline(name, lambda rec=rec: engine.merge_to_tree(rec, mesh=mesh, store_cache=store_cache),
                     {"recipe": rec.to_dict()})
    elif cfg.baselines:
        say("ptm search: no --base: task arithmetic / TIES / DARE baselines skipped")

    # --- search (one run, or one per Pareto sweep point)
    def f_for(lams: Sequence[float]) -> Callable[[np.ndarray], Any]:
        def f(w: np.ndarray):
            info = scored(pool.merge(w, space))
            value = math.fsum(lam * v for lam, v in zip(lams, info["objectives"], strict=True))
            return value, info
        return f

    sweeps = [(1.0,)] if len(objs) == 1 else sweep_weights(len(objs), cfg.pareto_points)
    results: list[tuple[tuple[float, ...], SearchResult]] = []
    for p, lams in enumerate(sweeps):
        run_id = "main" if len(objs) == 1 else f"pareto[{p}]"
        res = cma_search(f_for(lams), space, budget_evals=cfg.budget_evals, budget_seconds=cfg.budget_seconds,
                         seed=cfg.seed + p, sigma=cfg.sigma, popsize=cfg.popsize, log=log, run=run_id,
                         progress=progress)
        say(f"ptm search: {run_id} lambdas={lams}: {res.evaluations} candidates ({res.replayed} replayed "
            f"from the log), best {res.best_value:.4f}")
        results.append((lams, res))

    # --- pick the best (by the primary objective on validation) and write it once through the engine
    cands = log.of("candidate")
    best_rec = max(cands, key=lambda r: primary(r["info"]["scores"]))
    best_w = np.asarray(best_rec["weights"])
    best_dir = os.path.join(out_dir, "best")
    engine.merge(pool.recipe(best_w, space, best_dir), progress=False, overwrite=True)

    # --- test split: best merge, baselines (best of each family chosen on validation), every member
    def fam(name: str) -> str:
        return name.split("(")[0].split("[")[0]

    chosen: dict[str, dict[str, Any]] = {}
    for name, rec in done.items():
        key = "best_single" if name.startswith("member[") else fam(name)
        if key not in chosen or rec["value"] > chosen[key]["value"]:
            chosen[key] = rec
    test_scores: dict[str, dict[str, float]] = {}
    test_scores["search_best"] = test.scores(pool.merge(best_w, space))
    for key, rec in chosen.items():
        name = rec["name"]
        if name == "uniform_soup":
            params = pool.merge(uniform[:1], simplex)
        elif name.startswith("member["):
            params = pool.member_params(int(name[7:-1]))
        else:
            params = engine.merge_to_tree(engine_recipes[name], mesh=mesh, store_cache=store_cache)
        test_scores[key] = test.scores(params)
    members_test = {}
    for i in range(pool.n):
        members_test[pool.members[i]] = test.scores(pool.member_params(i))

    def objective_view(s: dict[str, float]) -> dict[str, float]:
        return {o.label: o(s) for o in objs} | {"primary": primary(s)}

    weights_final = best_w.tolist()
    nontrivial = int(np.sum(best_w.max(axis=0) >= NONTRIVIAL)) if space.kind == "simplex" else \
        int(np.sum(np.abs(best_w).max(axis=0) >= NONTRIVIAL))
    summary: dict[str, Any] = {
        "config": header, "out": out_dir, "space": asdict(space), "pool": pool.members, "base": pool.base,
        "evaluations": len(cands), "val_evaluations_total": len(cands) + len(done),
        "search": [{"lambdas": list(l_), "run": r.run, "best_value": r.best_value,
                    "best_weights": r.best_weights, "evaluations": r.evaluations, "replayed": r.replayed,
                    "generations": r.generations} for l_, r in results],
        "best": {"weights": weights_final, "val_scores": best_rec["info"]["scores"],
                 "val": objective_view(best_rec["info"]["scores"]), "test_scores": test_scores["search_best"],
                 "test": objective_view(test_scores["search_best"]), "path": best_dir,
                 "nontrivial_weights": nontrivial, "nontrivial_threshold": NONTRIVIAL},
        "baselines": {k: {"chosen": rec["name"], "val": objective_view(rec["scores"]),
                          "val_scores": rec["scores"], "test": objective_view(test_scores[k]),
                          "test_scores": test_scores[k]}
                      for k, rec in chosen.items()},
        "members_test": {p: objective_view(s) | {"scores": s} for p, s in members_test.items()},
    }
    bt = summary["best"]["test"]["primary"]
    summary["headline"] = {
        "objective": primary.label, "search_best_test": bt,
        "uniform_soup_test": summary["baselines"]["uniform_soup"]["test"]["primary"],
        "best_single_test": summary["baselines"]["best_single"]["test"]["primary"],
        "best_single": summary["baselines"]["best_single"]["chosen"],
        **{f"{k}_test": v["test"]["primary"] for k, v in summary["baselines"].items()
           if k not in ("uniform_soup", "best_single")},
        "search_best_val": summary["best"]["val"]["primary"],
        "nontrivial_weights": f"{nontrivial}/{pool.n}", "evaluations": len(cands),
    }
    if len(objs) > 1:
        # the front over everything scored on validation: candidates, pool members and baselines
        scored_all = [{"val": r["info"]["objectives"], "weights": r["weights"], "source": r["run"]}
                      for r in cands]
        scored_all += [{"val": r["objectives"], "weights": r.get("weights"), "source": n}
                       for n, r in done.items()]
        front = pareto_front(np.array([p["val"] for p in scored_all]))
        summary["pareto"] = {"objectives": [o.label for o in objs], "front": [scored_all[i] for i in front]}
        front_test = []
        for lams, r in results:
            s = test.scores(pool.merge(np.asarray(r.best_weights), space))
            front_test.append({"lambdas": list(lams), "test": [o(s) for o in objs],
                               "val": [o(r.best_info["scores"]) for o in objs]})
        summary["pareto"]["per_point_test"] = front_test
        _plot_front(summary, cands, done, objs, os.path.join(out_dir, "pareto_front.png"))
    _plot_convergence(cands, done, primary, os.path.join(out_dir, "convergence.png"))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    return summary


# ----------------------------------------------------------------------------------------------- plots


def _plot_convergence(cands: list[dict], baselines: dict[str, dict], primary: Objective, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = [primary(r["info"]["scores"]) for r in cands]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(range(1, len(vals) + 1), vals, s=10, color="0.6", label="candidate")
    ax.plot(range(1, len(vals) + 1), np.maximum.accumulate(vals), color="C0", label="best so far")
    ref: dict[str, float] = {}  # the best configuration of each baseline family on validation
    for n, r in baselines.items():
        fam = "best single" if n.startswith("member[") else n.split("(")[0].replace("_", " ")
        ref[fam] = max(ref.get(fam, -math.inf), r["value"])
    for k, (n, v) in enumerate(ref.items()):
        ax.axhline(v, linestyle="--", linewidth=1, color=f"C{k + 1}", label=n)
    ax.set_xlabel("candidate evaluation")
    label = primary.label if len(primary.label) <= 30 else f"macro-average of {len(primary.weights)} tasks"
    ax.set_ylabel(f"validation objective\n({label})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_front(summary: dict, cands: list[dict], baselines: dict[str, dict], objs: Sequence[Objective],
                path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = np.array([r["info"]["objectives"] for r in cands])
    front = np.array([p["val"] for p in summary["pareto"]["front"]])
    fig, ax = plt.subplots(figsize=(6, 5))
    c = pts[:, 2] if pts.shape[1] > 2 else None
    ax.scatter(pts[:, 0], pts[:, 1], s=10, c=c if c is not None else "0.7", label="candidates")
    order = np.argsort(front[:, 0])
    ax.plot(front[order, 0], front[order, 1], "o-", color="C3", label="non-dominated (validation)")
    for n, r in baselines.items():
        v = r["objectives"]
        single = n.startswith("member[")
        ax.scatter([v[0]], [v[1]], marker="x" if single else "^", s=40, label=None if single else n,
                   color="k" if single else None)
    ax.set_xlabel(objs[0].label)
    ax.set_ylabel(objs[1].label)
    ax.set_title("Pareto front" + (f" (colour: {objs[2].label})" if len(objs) > 2 else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
