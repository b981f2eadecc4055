"""The study as one resumable pipeline: train every run, merge and evaluate every model, select, report.

Order (paper Sections 2-4): theta_pre (if pretrained here) -> theta_G -> skill runs theta_D -> CFT on D_i ->
RT on G + D_i -> [CFT/RT on all skills] -> PTM merges (each method over the omega grid, plus omega = |D|/|G|)
-> multi-skill merges -> pairwise merges -> evaluation -> selection on validation -> test -> report.

Every stage is idempotent. A training stage is done when its run dir has `run.json` with `complete: true`
(written by ptm.train.loop.train, which also resumes an interrupted run from its last checkpoint); before
training, the stage's spec is written to `<run>/experiment_run.json` and a rerun with a different spec refuses
to touch the run. Merged models are evaluated in memory (merge_to_tree); every score is cached
as `scores/<split>/<model>.json` (written atomically) together with a fingerprint of what produced it.

SPMD: on a multi-host slice every worker runs the same `ptm experiment` command (`ptm.parallel.distributed`
joins the cluster first) and all stages use one global mesh (the `[mesh]` table): training is sharded as in
`ptm train`, merges are computed shard-locally, evaluation splits every batch's rows over the processes and
gathers the results (`ptm.eval.decode`), so every process holds the same scores. Decisions that depend on the
shared results dir (is a run done, is a score cached) are process 0's, broadcast to all (`ptm.parallel.sync`);
only process 0 writes reports, JSON, CSV, plots and markers, each after a barrier that every process has
reached at the end of the stage. A dead process makes the others fail fast (heartbeat timeout); relaunching
the command on every host resumes from the last marker, and a training stage from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from ptm.ckpt.format import is_gcs
from ptm.errors import ConfigError, DataError
from ptm.experiment import costs as C
from ptm.experiment import files
from ptm.experiment.config import ExperimentConfig, is_seqio, uses_seqio
from ptm.experiment.plan import ModelSpec, RunSpec, plan_models, plan_runs
from ptm.experiment.task_specs import by_kind
from ptm.parallel import sync

SPLITS = ("validation", "test")


class Experiment:
    """One study: `run()` does whatever is not done yet and writes the report."""

    def __init__(
        self, cfg: ExperimentConfig, *, log: Callable[[str], None] | None = None, progress: bool = False
    ):
        self.cfg = cfg
        self.out = cfg.results_dir
        self.say = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.progress = progress
        self.runs = plan_runs(cfg)
        self.run_costs: dict[str, C.RunCost] = {}
        self.timings: dict[str, float] = {}
        self._items: dict[str, list] = {}
        self._store_cache: dict[str, Any] = {}
        self._tok = None
        self._model_cfg = None
        self._mesh: Any = False  # not decided yet
        self.heuristics: dict[str, float] = {}
        self.scores: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in SPLITS}
        self.models: dict[str, ModelSpec] = {}
        self._extra: Any = None  # extra_eval.ExtraScorer, for lm_eval: / code tasks

    # -------------------------------------------------------------------------------------------- paths

    def run_dir(self, rid: str) -> str:
        return files.join(self.out, "runs", rid)

    def ckpt(self, ref: str | None) -> str | None:
        if ref is None:
            return None
        return self.run_dir(ref[1:]) if ref.startswith("@") else self.cfg.resolve(ref)

    @property
    def pre_path(self) -> str:
        return self.run_dir("pre") if self.cfg.base.pretrain else self.cfg.resolve(self.cfg.base.checkpoint)

    @property
    def general_path(self) -> str:
        g = self.cfg.general.checkpoint
        return self.run_dir("general") if g is None else self.cfg.resolve(g)

    # -------------------------------------------------------------------------------------------- top level

    def run(self) -> dict[str, Any]:
        t0, c0 = time.perf_counter(), time.process_time()
        from ptm.parallel import distributed

        distributed.initialize()  # before anything touches jax devices: one SPMD program on every host
        files.makedirs(self.out)
        self._setup_jax()
        self._write_config()
        self.prepare_data()
        for i, r in enumerate(self.runs, 1):
            self.train_run(r, i, len(self.runs))
        self.plan_models()
        self.evaluate_all()
        from ptm.experiment import analysis, report

        results = analysis.analyze(self)
        results["timings"] = {
            **self.timings,
            "total": {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0},
        }
        sync.barrier("report/start")
        if sync.is_writer():
            report.write_report(results, self.out)
            self.say(
                f"[experiment {self.cfg.name}] report: {files.join(self.out, 'tables.md')} "
                f"({time.perf_counter() - t0:.1f} s)"
            )
        sync.barrier("report/done")  # every host returns once the report exists
        return results

    @contextlib.contextmanager
    def _timed(self, name: str):
        """Record wall and CPU seconds of a stage (CPU time is the honest number on a shared machine)."""
        rec: dict[str, float] = {}
        t, c = time.perf_counter(), time.process_time()
        try:
            yield rec
        finally:
            rec.update(wall_s=time.perf_counter() - t, cpu_s=time.process_time() - c)
            self.timings[name] = rec

    def _setup_jax(self) -> None:
        if not self.cfg.compilation_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return
        import jax

        # Every run of one shape compiles the same train step; the persistent cache turns the second and later
        # compilations (and those of a rerun) into a disk read.
        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", files.join(self.out, "jax_cache"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    def _write_config(self) -> None:
        files.write_json(files.join(self.out, "experiment.json"), self.cfg.to_dict())

    # -------------------------------------------------------------------------------------------- data

    def prepare_data(self) -> None:
        cfg = self.cfg
        if cfg.suite is not None:

            suite_dir = files.join(self.out, "suite")
            with self._timed("suite"):
                if sync.is_writer():  # one writer; the others wait for it
                    _generate_suite(suite_dir, seed=cfg.suite.seed, sizes=cfg.suite.sizes or None)
                sync.stage_done("suite")
            self.say(f"[experiment {cfg.name}] toy suite ready: {suite_dir}")
        self._check_seqio()
        missing = []
        for r in self.runs:
            for s in r.sources:
                p = cfg.resolve(s.path)
                if not p.startswith("gs://") and not is_seqio(p) and not os.path.exists(p):
                    missing.append(f"{p} (run {r.id})")
        for split in SPLITS:
            p = cfg.resolve(getattr(cfg.eval, split))
            if not p.startswith("gs://") and not is_seqio(p) and not os.path.exists(p):
                missing.append(f"{p} (eval {split})")
        missing += self._check_extra_tasks()
        if missing:
            raise DataError(f"{cfg.source}: missing data: " + "; ".join(missing))

    def _all_tasks(self) -> list[str]:
        cfg = self.cfg
        return list(cfg.eval.general_tasks) + [t for s in cfg.skills for t in s.tasks + s.benign_tasks]

    def _check_extra_tasks(self) -> list[str]:
        """lm-eval / code tasks: fail before training if they cannot run; their missing files."""
        kinds = by_kind(self._all_tasks())
        extra = kinds["lm_eval"] + kinds["code"]
        if not extra:
            return []
        from ptm.experiment import extra_eval

        return extra_eval.check_ready(self.cfg, extra, SPLITS)

    def _check_seqio(self) -> None:
        """Import the `[seqio] modules` and check every `seqio:` training source names a usable Task/Mixture,
        before anything trains (a typo is a ConfigError listing the registered names)."""
        cfg = self.cfg
        if not uses_seqio(cfg):
            return
        from ptm.data import seqio_source

        seqio_source.import_modules(cfg.seqio.modules)
        for path in dict.fromkeys(s.path for r in self.runs for s in r.sources if is_seqio(s.path)):
            name = seqio_source.task_name(path)
            seqio_source.kind(name, seqio_source.get_provider(name))

    # -------------------------------------------------------------------------------------------- training

    def _run_fingerprint(self, r: RunSpec) -> dict[str, Any]:
        cfg = self.cfg
        fp = {
            "id": r.id,
            "kind": r.kind,
            "sources": [{**asdict(s), "path": cfg.resolve(s.path)} for s in r.sources],
            "init": self.ckpt(r.init),
            "hyper": asdict(r.hyper),
            "model": cfg.model.to_dict(),
            "seq_len": cfg.train.seq_len,
            "global_batch_size": cfg.train.global_batch_size,
            "grad_accum_steps": cfg.train.grad_accum_steps,
            "seed": cfg.train.seed,
            "pack": cfg.train.pack,
            "tokenizer": cfg.tokenizer_spec(),
        }
        if uses_seqio(cfg):  # (only then: fingerprints of existing JSONL studies stay as they were)
            fp["seqio"] = asdict(cfg.seqio)
        return fp

    def train_run(self, r: RunSpec, i: int, n: int) -> None:
        cfg, d = self.cfg, self.run_dir(r.id)
        spec = self._run_fingerprint(r)
        spec_file = files.join(d, "experiment_run.json")
        # Process 0 reads the shared results dir; every process acts on what it saw.
        seen = sync.broadcast_json(
            f"train/{r.id}",
            {
                "old": files.read_json(spec_file) if files.exists(spec_file) else None,
                "done": files.try_json(files.join(d, "run.json")),  # unreadable (killed while writing): not done
            }
            if sync.is_writer()
            else None,
        )
        if seen["old"] is not None:
            old = seen["old"]
            spec = json.loads(json.dumps(spec, default=str))
            if old != spec:
                diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
                raise ConfigError(
                    f"{d}: this run was trained with different settings ({', '.join(diff)}); "
                    "use another results_dir or delete the run"
                )
        done = seen["done"]
        tag = f"[experiment {cfg.name}] ({i}/{n}) train {r.id}"
        if done and done.get("complete"):
            self.run_costs[r.id] = C.RunCost.from_run_json(done, files.join(d, "run.json"))
            self.say(f"{tag}: done before, reused ({self.run_costs[r.id].steps} steps)")
            return
        files.makedirs(d)
        files.write_json(spec_file, spec)
        sync.barrier(f"train/{r.id}/spec")
        from ptm.data.pipeline import DataConfig, SourceConfig
        from ptm.train.loop import train
        from ptm.train.optimizer import OptimizerConfig

        h = r.hyper
        data = DataConfig(
            sources=[
                SourceConfig(path=cfg.resolve(s.path), name=s.name, max_examples=s.max_examples)
                for s in r.sources
            ],
            seq_len=cfg.train.seq_len,
            global_batch_size=cfg.train.global_batch_size,
            num_epochs=h.epochs,
            seed=cfg.train.seed,
            pack=cfg.train.pack,
            # seqio sources go through ptm's planner (subsets, G + D_i), counted like JSONL
            seqio_modules=cfg.seqio.modules,
            split=cfg.seqio.split,
            use_cached=cfg.seqio.use_cached,
            seqio_lm="examples",
        )
        opt = OptimizerConfig(
            learning_rate=h.learning_rate, warmup_ratio=h.warmup_ratio, weight_decay=h.weight_decay
        )
        self.say(f"{tag} ...")
        with self._timed(f"train_{r.id}") as tm:
            res = train(
                d,
                data=data,
                model=cfg.model,
                optimizer=opt,
                mesh=cfg.mesh,
                tokenizer=cfg.tokenizer_spec(),
                init_from=self.ckpt(r.init),
                grad_accum_steps=cfg.train.grad_accum_steps,
                save_every=cfg.train.save_every,
                seed=cfg.train.seed,
                progress=self.progress,
            )
            sync.stage_done(f"train/{r.id}")  # run.json (process 0, in train) is visible to every host now
        done = files.read_json(files.join(d, "run.json"))
        self.run_costs[r.id] = C.RunCost.from_run_json(done, files.join(d, "run.json"))
        self.say(
            f"{tag}: {res.steps} steps, loss {float('nan') if res.final_loss is None else res.final_loss:.3f}"
            f" ({tm['wall_s']:.1f} s"
            + (f", resumed at step {res.resumed_from})" if res.resumed_from else ")")
        )

    # -------------------------------------------------------------------------------------------- models

    def heuristic_omegas(self) -> dict[str, float]:
        """omega = |D|/|G| per skill (Eq. 7), from data.train_examples in the checkpoints' ptm/metadata."""
        from ptm.merge import recipe as R

        out = {}
        for s in self.cfg.skills:
            rec = R.Recipe(
                "task_arithmetic",
                {
                    "pre": self.pre_path,
                    "general": self.general_path,
                    "skills": [self.run_dir(f"skill_{s.name}")],
                },
            )
            out[s.name] = R.heuristic_omegas(rec, R.input_metas(rec))[0]
        return out

    def plan_models(self, heuristics: dict[str, float] | None = None) -> None:
        """Every model that is evaluated on validation (test follows selection)."""
        self.heuristics = dict(heuristics) if heuristics is not None else self.heuristic_omegas()
        self.models.update(plan_models(self.cfg, self, self.heuristics))

    def tasks_for(self, m: ModelSpec) -> list[str]:
        cfg = self.cfg
        if m.skill is None:
            tasks = list(cfg.eval.general_tasks)
            for s in cfg.skills:
                tasks += list(s.tasks) + list(s.benign_tasks)
            return tasks
        s = cfg.skill(m.skill)
        return list(cfg.eval.general_tasks) + list(s.tasks) + list(s.benign_tasks)

    # -------------------------------------------------------------------------------------------- evaluation

    def evaluate_all(self) -> None:
        from ptm.experiment import analysis

        ids = list(self.models)
        try:
            with self._timed("eval_validation"):
                for i, mid in enumerate(ids, 1):
                    self.score(mid, "validation", f"({i}/{len(ids)})")
            test_ids = ids if self.cfg.eval.test_all else analysis.reported_models(self)
            with self._timed("eval_test"):
                for i, mid in enumerate(test_ids, 1):
                    self.score(mid, "test", f"({i}/{len(test_ids)})")
        finally:
            if self._extra is not None:
                self._extra.close()

    def _eval_items(self, split: str, tasks: Sequence[str]) -> list:
        if split not in self._items:
            from ptm.eval.evalset import load_suite
            from ptm.toy import checkers as toy_checkers

            toy_checkers.register()  # the toy suite's coding items use its toy_lisp checker

            items = load_suite(self.cfg.resolve(getattr(self.cfg.eval, split)))
            cap = self.cfg.eval.max_items_per_task
            by_task: dict[str, list] = {}
            for it in items:
                lst = by_task.setdefault(it.task, [])
                if cap is None or len(lst) < cap:
                    lst.append(it)
            self._items[split] = by_task
        by_task = self._items[split]
        missing = [t for t in tasks if t not in by_task]
        if missing:
            raise DataError(
                f"{self.cfg.resolve(getattr(self.cfg.eval, split))}: no eval items for task(s) "
                f"{missing} (found: {sorted(by_task)})"
            )
        return [it for t in tasks for it in by_task[t]]

    def _fingerprint(self, m: ModelSpec, tasks: Sequence[str], n_items: int, split: str = "") -> str:
        src: dict[str, Any] = {"recipe": m.recipe} if m.recipe else {"run": m.run}
        paths = [m.run] if m.run else _recipe_paths(m.recipe)
        src["checkpoints"] = [_ckpt_identity(p) for p in paths]
        ev = self.cfg.eval
        src["eval"] = {
            "tasks": list(tasks),
            "items": n_items,
            "max_new_tokens": ev.max_new_tokens,
            "max_items_per_task": ev.max_items_per_task,
        }
        kinds = by_kind(list(tasks))
        if kinds["lm_eval"] or kinds["code"]:  # only then: the fingerprints of other studies stay as they were
            from ptm.experiment import extra_eval

            src["eval"]["extra"] = extra_eval.settings(self.cfg, kinds["lm_eval"] + kinds["code"], split)
        return hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def score(self, mid: str, split: str, tag: str = "") -> dict[str, Any]:
        m = self.models[mid]
        tasks = self.tasks_for(m)
        kinds = by_kind(tasks)
        extra = kinds["lm_eval"] + kinds["code"]
        native = [t.spec for t in kinds["native"]]
        items = self._eval_items(split, native) if native else []
        fp = self._fingerprint(m, tasks, len(items), split)
        path = files.join(self.out, "scores", split, f"{mid}.json")
        cached = sync.broadcast_json(f"score/{split}/{mid}", files.try_json(path) if sync.is_writer() else None)
        if cached is not None:
            if cached.get("fingerprint") == fp and cached.get("complete"):
                self.scores[split][mid] = cached
                return cached
        t = time.perf_counter()
        params, mcfg = self._params(m)
        from ptm.eval.harness import evaluate

        scored = (
            evaluate(
                params,
                mcfg,
                self._tokenizer(),
                items,
                batch_size=self.cfg.eval.batch_size,
                max_new_tokens=self.cfg.eval.max_new_tokens,
                mesh=self._eval_mesh(),
                where=mid,
            ).tasks
            if items
            else {}
        )
        more = self._score_extra(params, mcfg, extra, split, mid) if extra else {}
        rec = {
            "model": mid,
            "split": split,
            "fingerprint": fp,
            "complete": True,
            "spec": _json_safe(asdict(m)),
            "tasks": {k: v.score for k, v in scored.items()},
            "n_items": {k: v.n_items for k, v in scored.items()},
            "examples": {k: v.examples for k, v in scored.items()},
            "elapsed_s": time.perf_counter() - t,
        }
        if more:  # lm-eval / code tasks, in the config's order after the eval-set ones
            rec["tasks"].update({k: v["score"] for k, v in more.items()})
            rec["n_items"].update({k: v["n"] for k, v in more.items()})
            rec["extra"] = more
        rec = json.loads(json.dumps(rec, default=str))  # what the cache would give back
        sync.barrier(f"score/{split}/{mid}")  # every process has the (gathered, identical) scores
        files.write_json(path, rec)
        self.scores[split][mid] = rec
        self.say(
            f"[experiment {self.cfg.name}] {tag} eval {split} {mid}: "
            + " ".join(f"{k}={v:.2f}" for k, v in rec["tasks"].items())
            + f" ({rec['elapsed_s']:.1f} s)"
        )
        return rec

    def _score_extra(self, params, mcfg, specs, split: str, mid: str) -> dict[str, Any]:
        from ptm.experiment.extra_eval import ExtraScorer

        if self._extra is None:
            self._extra = ExtraScorer(self.cfg, log=self.say)
        return self._extra.score(params, mcfg, self._tokenizer(), specs, split, mesh=self._eval_mesh(), where=mid)

    def _tokenizer(self):
        if self._tok is None:
            from ptm.data.tokenizers import load_tokenizer

            self._tok = load_tokenizer(self.cfg.tokenizer_spec(), self.cfg.seqio.modules)
        return self._tok

    def _eval_mesh(self):
        """Evaluate sharded like training when there is more than one device (a 7B model needs the pod)."""
        if self._mesh is False:
            import jax

            if jax.device_count() > 1:
                from ptm.parallel.mesh import make_mesh

                self._mesh = make_mesh(self.cfg.mesh)
            else:
                self._mesh = None
        return self._mesh

    def _params(self, m: ModelSpec):
        mesh = self._eval_mesh()
        if m.run is not None:
            from ptm.ckpt.params import load_checkpoint

            params, mcfg, _ = load_checkpoint(m.run, mesh=mesh)
            return params, mcfg
        from ptm.merge import recipe as R
        from ptm.merge.engine import merge_to_tree

        if self._model_cfg is None:
            from ptm.ckpt import format as ckpt_format

            self._model_cfg = ckpt_format.resolve(self.general_path).model_config()
        shardings = None
        if mesh is not None:  # each device's slice is merged from just that slice of the inputs
            from ptm.ckpt.tree import flatten
            from ptm.model.sharding import param_shardings

            shardings = flatten(param_shardings(self._model_cfg, mesh))
        tree = merge_to_tree(R.Recipe(**m.recipe), shardings=shardings, store_cache=self._store_cache)
        return tree, self._model_cfg


# ---------------------------------------------------------------------------------------- helpers


def _recipe_paths(recipe: dict[str, Any] | None) -> list[str]:
    out: list[str] = []
    for v in (recipe or {}).get("inputs", {}).values():
        out.extend(v if isinstance(v, list) else [v])
    return out


def _ckpt_identity(path: str) -> Any:
    """What cheaply identifies a checkpoint's contents: its run.json (final step and counts) if a run."""
    rj = files.join(path, "run.json")
    if files.exists(rj):
        d = files.read_json(rj)
        return {"path": path, "steps": d.get("steps"), "data": d.get("data")}
    return {"path": path}


def _json_safe(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _generate_suite(out: str, *, seed: int, sizes: dict | None) -> None:
    """The toy suite into the results dir. ptm.toy writes local disk only, so for gs:// it is built in a local
    temporary dir and copied up, manifest.json last (present = complete); an intact copy is kept as it is."""
    from ptm.toy.suite import generate_suite

    if not is_gcs(out):
        generate_suite(out, seed=seed, sizes=sizes)
        return
    with tempfile.TemporaryDirectory(prefix="ptm-suite-") as tmp:
        local = os.path.join(tmp, "suite")
        generate_suite(local, seed=seed, sizes=sizes)
        with open(os.path.join(local, "manifest.json")) as f:
            want = json.load(f)
        have = files.try_json(files.join(out, "manifest.json"))
        if have == want:
            return
        if have is not None:
            raise DataError(f"{out}: holds another toy suite (manifest differs); use another results_dir")
        files.put_tree(local, out, last="manifest.json")


def run_experiment(
    path: str,
    results_dir: str | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load the TOML config at `path` and run the study (the `ptm experiment` command)."""
    from ptm.experiment.config import load

    return Experiment(load(path, results_dir), progress=progress, log=log).run()
