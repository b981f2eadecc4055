"""The search study ("If You Can't Use Them, Recycle Them", arXiv 2412.04144; docs/search.md).

`run` wires the steps of one study, each a method of `Study`: baselines on validation, the CMA-ES search (or
one search per Pareto sweep point), the best candidate written once through the merge engine, test scores of
the best merge, the baselines and every member, then summary.json and the plots. Everything evaluated is
logged, so a killed study resumes from `<out>/search_log.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from ptm.parallel import sync
from ptm.search import plots
from ptm.search.cma import LOG_NAME, SearchLog, SearchResult, cma_search
from ptm.search.config import SearchConfig
from ptm.search.objective import Objective, check_tasks
from ptm.search.pool import Pool
from ptm.search.space import Space

NONTRIVIAL = 0.05  # a pool member "counts" in a simplex merge when its weight is at least this

# ------------------------------------------------------------------------------------------- harness adapter


class _HostLog(SearchLog):
    """The search log on every process; only process 0 appends to the file (the others keep records in memory:
    every process evaluates the same candidates and gets the same, gathered, scores)."""

    def append(self, rec: dict[str, Any]) -> None:
        if sync.is_writer():
            super().append(rec)
        else:
            self.records.append(rec)


class Evaluator:
    """Scores params on the objective tasks of one eval split with ptm.eval (items loaded once)."""

    def __init__(self, files: str, tasks: set[str] | None, model_config, tokenizer, mesh, cfg: SearchConfig,
                 objectives: Sequence[Objective] = ()):
        from ptm.eval import scorers
        from ptm.eval.evalset import load_suite
        from ptm.toy import checkers as toy_checkers

        toy_checkers.register()  # the built-in toy suite's coding items name its checker
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


def family(name: str) -> str:
    """The baseline family of a logged baseline name: `task_arithmetic(scale=0.5)` -> `task_arithmetic`."""
    return name.split("(")[0].split("[")[0]


class Study:
    """One search study over a loaded pool; `run` calls its steps in order."""

    def __init__(self, cfg: SearchConfig, out_dir: str, *, use_mesh: bool = False,
                 log_fn: Callable[[str], None] | None = None):
        from ptm.data.tokenizers import load_tokenizer

        self.say = log_fn or (lambda s: print(s, file=sys.stderr, flush=True))
        cfg.validate()
        from ptm.parallel import distributed

        distributed.initialize()  # SPMD: every host runs the same study over one global mesh
        import jax

        os.makedirs(out_dir, exist_ok=True)
        self.cfg, self.out_dir = cfg, out_dir
        self.mesh = None
        if use_mesh or cfg.mesh is not None or jax.process_count() > 1:
            from ptm.parallel.mesh import make_mesh

            self.mesh = make_mesh(cfg.mesh_config())
        t_load = time.perf_counter()
        pool = self.pool = Pool(cfg.pool, cfg.base, self.mesh)
        model_config = pool.model_config()
        tok = load_tokenizer(pool.tokenizer)
        space = self.space = cfg.make_space(pool.n)
        pool.coefficient_fn(space)  # fail early on a bad space (e.g. more layer groups than layers)
        self.say(f"ptm search: pool of {pool.n} checkpoint(s){' + base' if pool.base else ''}, "
                 f"{pool.bytes() / 2**20:.1f} MiB resident, loaded in {time.perf_counter() - t_load:.1f} s; "
                 f"space {space.kind}/{space.parametrisation}, {space.dim} dims")
        self.objs = cfg.objectives
        tasks = {t for o in self.objs for t in o.weights}
        self.val = Evaluator(cfg.val, tasks, model_config, tok, self.mesh, cfg, self.objs)
        self.test = Evaluator(cfg.test, tasks, model_config, tok, self.mesh, cfg, self.objs)
        self.header = {**cfg.header(), "pool": pool.members, "base": pool.base}
        # Process 0 repairs a torn last line and writes the header; the others read the log after it.
        if sync.is_writer():
            self.log = _HostLog(os.path.join(out_dir, LOG_NAME), self.header)
        sync.barrier("search/log")
        if not sync.is_writer():
            self.log = _HostLog(os.path.join(out_dir, LOG_NAME), self.header)
        self.primary = self.objs[0] if len(self.objs) == 1 else Objective({t: 1.0 for t in sorted(tasks)}, "mean")
        self.baselines: dict[str, dict[str, Any]] = {r["name"]: r for r in self.log.of("baseline")}
        self.engine_recipes = self._engine_recipes()
        self.store_cache: dict[str, Any] = {}

    # --- candidates and baselines as params

    def scored(self, params) -> dict[str, Any]:
        """Validation scores of `params` and the value of every objective on them."""
        s = self.val.scores(params)
        return {"scores": s, "objectives": [o(s) for o in self.objs]}

    def uniform_soup(self):
        return self.pool.merge(np.full((1, self.pool.n), 1.0 / self.pool.n), Space(n=self.pool.n))

    def baseline_params(self, name: str):
        """The params of a logged baseline, by name (`uniform_soup`, `member[i]`, or an engine recipe)."""
        from ptm.merge import engine

        if name == "uniform_soup":
            return self.uniform_soup()
        if name.startswith("member["):
            return self.pool.member_params(int(name[7:-1]))
        return engine.merge_to_tree(self.engine_recipes[name], mesh=self.mesh, store_cache=self.store_cache)

    def _engine_recipes(self) -> dict[str, Any]:
        """The task arithmetic / DARE / TIES baselines (by the merge engine), when there is a base."""
        from ptm.merge import recipe as R

        cfg, pool = self.cfg, self.pool
        out: dict[str, R.Recipe] = {}
        if not (cfg.baselines and pool.base):
            return out
        inputs = {"pre": pool.base, "skills": pool.members}
        for lam in cfg.baseline_scales:
            out[f"task_arithmetic(scale={lam})"] = R.Recipe(method="task_arithmetic", inputs=inputs,
                                                            weights=[lam] * pool.n)
            out[f"dare(scale={lam},p={cfg.dare_drop_rate})"] = R.Recipe(
                method="dare", inputs=inputs, weights=[lam] * pool.n, drop_rate=cfg.dare_drop_rate, seed=cfg.seed)
        out[f"ties(density={cfg.ties_density})"] = R.Recipe(method="ties", inputs=inputs, weights=[1.0] * pool.n,
                                                            density=cfg.ties_density)
        return out

    # --- steps

    def baseline(self, name: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Score one baseline on validation and log it; a logged one (resume) is not re-evaluated."""
        if name not in self.baselines:
            t1 = time.perf_counter()
            info = self.scored(self.baseline_params(name))
            self.baselines[name] = {"type": "baseline", "name": name, **extra, **info,
                                    "value": self.primary(info["scores"]), "seconds": time.perf_counter() - t1}
            self.log.append(self.baselines[name])
        return self.baselines[name]

    def run_baselines(self) -> None:
        n = self.pool.n
        self.baseline("uniform_soup", {"weights": np.full(n, 1.0 / n).tolist()})
        for i, m in enumerate(self.pool.members):
            self.baseline(f"member[{i}]", {"path": m})
        for name, rec in self.engine_recipes.items():
            self.baseline(name, {"recipe": rec.to_dict()})
        if self.cfg.baselines and not self.pool.base:
            self.say("ptm search: no --base: task arithmetic / TIES / DARE baselines skipped")

    def objective_fn(self, lams: Sequence[float]) -> Callable[[np.ndarray], Any]:
        """CMA-ES's objective for one sweep point: sum_j lambda_j f_j of the candidate merge, with its scores."""
        def f(w: np.ndarray):
            info = self.scored(self.pool.merge(w, self.space))
            return math.fsum(lam * v for lam, v in zip(lams, info["objectives"], strict=True)), info
        return f

    def search(self, progress: bool = True) -> list[tuple[tuple[float, ...], SearchResult]]:
        """One CMA-ES search, or one per Pareto sweep point (seed + p)."""
        cfg, objs = self.cfg, self.objs
        if cfg.budget_seconds is not None and sync.process_count() > 1:
            from ptm.errors import ConfigError

            raise ConfigError("budget_seconds is measured per process and could stop the processes at different "
                              "candidates; on several processes give budget_evals instead")
        sweeps = [(1.0,)] if len(objs) == 1 else sweep_weights(len(objs), cfg.pareto_points)
        results = []
        for p, lams in enumerate(sweeps):
            run_id = "main" if len(objs) == 1 else f"pareto[{p}]"
            res = cma_search(self.objective_fn(lams), self.space, budget_evals=cfg.budget_evals,
                             budget_seconds=cfg.budget_seconds, seed=cfg.seed + p, sigma=cfg.sigma,
                             popsize=cfg.popsize, log=self.log, run=run_id, progress=progress)
            self.say(f"ptm search: {run_id} lambdas={lams}: {res.evaluations} candidates ({res.replayed} "
                     f"replayed from the log), best {res.best_value:.4f}")
            results.append((lams, res))
        return results

    def write_best(self) -> tuple[dict[str, Any], np.ndarray, str]:
        """The best logged candidate by the primary objective on validation, written once through the engine:
        (its log record, its weights, the output dir)."""
        from ptm.merge import engine

        best_rec = max(self.log.of("candidate"), key=lambda r: self.primary(r["info"]["scores"]))
        best_w = np.asarray(best_rec["weights"])
        best_dir = os.path.join(self.out_dir, "best")
        mesh = None
        import jax

        if jax.process_count() > 1:  # every process writes its shards of each tensor, process 0 commits
            from jax.sharding import Mesh

            mesh = Mesh(np.array(jax.devices()), ("shard",))
        sync.barrier("search/best/start")
        engine.merge(self.pool.recipe(best_w, self.space, best_dir), progress=False, overwrite=True, mesh=mesh)
        sync.stage_done("search/best")
        return best_rec, best_w, best_dir

    def chosen_baselines(self) -> dict[str, dict[str, Any]]:
        """The best baseline of each family on validation ("best_single" for the pool members)."""
        chosen: dict[str, dict[str, Any]] = {}
        for name, rec in self.baselines.items():
            key = "best_single" if name.startswith("member[") else family(name)
            if key not in chosen or rec["value"] > chosen[key]["value"]:
                chosen[key] = rec
        return chosen

    def score_test(self, best_w: np.ndarray, chosen: dict[str, dict[str, Any]]
                   ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        """Test scores of the best merge and the chosen baselines (by family), and of every pool member."""
        test_scores = {"search_best": self.test.scores(self.pool.merge(best_w, self.space))}
        for key, rec in chosen.items():
            test_scores[key] = self.test.scores(self.baseline_params(rec["name"]))
        members_test = {self.pool.members[i]: self.test.scores(self.pool.member_params(i))
                        for i in range(self.pool.n)}
        return test_scores, members_test

    def pareto(self, results: list[tuple[tuple[float, ...], SearchResult]]) -> dict[str, Any]:
        """The non-dominated front over everything scored on validation (candidates, pool members, baselines),
        and each sweep point's best merge re-scored on test."""
        objs = self.objs
        scored_all = [{"val": r["info"]["objectives"], "weights": r["weights"], "source": r["run"]}
                      for r in self.log.of("candidate")]
        scored_all += [{"val": r["objectives"], "weights": r.get("weights"), "source": n}
                       for n, r in self.baselines.items()]
        front = pareto_front(np.array([p["val"] for p in scored_all]))
        out: dict[str, Any] = {"objectives": [o.label for o in objs], "front": [scored_all[i] for i in front]}
        per_point = []
        for lams, r in results:
            s = self.test.scores(self.pool.merge(np.asarray(r.best_weights), self.space))
            per_point.append({"lambdas": list(lams), "test": [o(s) for o in objs],
                              "val": [o(r.best_info["scores"]) for o in objs]})
        out["per_point_test"] = per_point
        return out

    def objective_view(self, s: dict[str, float]) -> dict[str, float]:
        return {o.label: o(s) for o in self.objs} | {"primary": self.primary(s)}

    def summary(self, results, best_rec: dict[str, Any], best_w: np.ndarray, best_dir: str,
                chosen: dict[str, dict[str, Any]], test_scores: dict[str, dict[str, float]],
                members_test: dict[str, dict[str, float]]) -> dict[str, Any]:
        """summary.json (without the Pareto block): weights and val/test scores of the best merge and of every
        baseline, the members' test scores, and a `headline` block."""
        pool, space, view = self.pool, self.space, self.objective_view
        n_cands = len(self.log.of("candidate"))
        big = best_w.max(axis=0) if space.kind == "simplex" else np.abs(best_w).max(axis=0)
        nontrivial = int(np.sum(big >= NONTRIVIAL))
        summary: dict[str, Any] = {
            "config": self.header, "out": self.out_dir, "space": asdict(space), "pool": pool.members,
            "base": pool.base, "evaluations": n_cands, "val_evaluations_total": n_cands + len(self.baselines),
            "search": [{"lambdas": list(l_), "run": r.run, "best_value": r.best_value,
                        "best_weights": r.best_weights, "evaluations": r.evaluations, "replayed": r.replayed,
                        "generations": r.generations} for l_, r in results],
            "best": {"weights": best_w.tolist(), "val_scores": best_rec["info"]["scores"],
                     "val": view(best_rec["info"]["scores"]), "test_scores": test_scores["search_best"],
                     "test": view(test_scores["search_best"]), "path": best_dir,
                     "nontrivial_weights": nontrivial, "nontrivial_threshold": NONTRIVIAL},
            "baselines": {k: {"chosen": rec["name"], "val": view(rec["scores"]), "val_scores": rec["scores"],
                              "test": view(test_scores[k]), "test_scores": test_scores[k]}
                          for k, rec in chosen.items()},
            "members_test": {p: view(s) | {"scores": s} for p, s in members_test.items()},
        }
        b = summary["baselines"]
        summary["headline"] = {
            "objective": self.primary.label, "search_best_test": summary["best"]["test"]["primary"],
            "uniform_soup_test": b["uniform_soup"]["test"]["primary"],
            "best_single_test": b["best_single"]["test"]["primary"], "best_single": b["best_single"]["chosen"],
            **{f"{k}_test": v["test"]["primary"] for k, v in b.items() if k not in ("uniform_soup", "best_single")},
            "search_best_val": summary["best"]["val"]["primary"],
            "nontrivial_weights": f"{nontrivial}/{pool.n}", "evaluations": n_cands,
        }
        return summary


def run(cfg: SearchConfig, out_dir: str, *, use_mesh: bool = False, progress: bool = True,
        log_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The full search study; resumable from `<out_dir>/search_log.jsonl`. Returns the summary dict."""
    st = Study(cfg, out_dir, use_mesh=use_mesh, log_fn=log_fn)
    st.run_baselines()
    results = st.search(progress)
    best_rec, best_w, best_dir = st.write_best()
    chosen = st.chosen_baselines()
    test_scores, members_test = st.score_test(best_w, chosen)
    summary = st.summary(results, best_rec, best_w, best_dir, chosen, test_scores, members_test)
    cands = st.log.of("candidate")
    if len(st.objs) > 1:
        summary["pareto"] = st.pareto(results)  # evaluates on every process
    sync.barrier("search/report/start")
    if sync.is_writer():  # one writer for the plots and the summary
        if len(st.objs) > 1:
            plots.plot_front(summary, cands, st.baselines, st.objs, os.path.join(out_dir, "pareto_front.png"))
        plots.plot_convergence(cands, st.baselines, st.primary, os.path.join(out_dir, "convergence.png"))
        sync.write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1, sort_keys=True))
    sync.barrier("search/report/done")
    return summary
