"""The CMA-ES ask/tell loop over a plain Python objective, and its JSONL log (which doubles as the resume
state: a resumed search replays the log through the same seeded CMA-ES)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptm.errors import ConfigError
from ptm.search.space import Space

LOG_NAME = "search_log.jsonl"
LOG_VERSION = 1

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

