"""The toy checkpoint pool for merge search: the toy suite generated, then theta_pre and every pool member
trained from a TOML file (configs/search/toy_pool.toml); `ptm search build-pool` is its CLI."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ptm.errors import ConfigError
from ptm.parallel import sync
from ptm.toml_file import load_toml

_TRAIN_KEYS = {"seq_len", "global_batch_size", "learning_rate", "warmup_ratio", "weight_decay", "seed",
               "num_epochs"}
# A source: a suite file, optionally only some of its tasks (`tasks`: G's per-task mixture), repeated `epochs`
# times or sampled at `rate` per mixture epoch (ptm.data.pipeline.SourceConfig).
_SOURCE_KEYS = {"path", "max_examples", "epochs", "rate", "tasks"}


def load_pool_config(path: str) -> dict[str, Any]:
    cfg = load_toml(path, "pool config")
    for key in ("suite", "model", "base", "member"):
        if key not in cfg:
            what = 'model (a preset name such as model = "toy_2m", or a [model] table)' if key == "model" \
                else f"[{key}]"
            raise ConfigError(f"{path}: missing {what}")
    names = [m.get("name") for m in cfg["member"]]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"{path}: every [[member]] needs a unique non-empty name (got {names})")
    for m in cfg["member"]:
        init = m.get("init", "base")
        if init != "base" and init not in names[: names.index(m["name"])]:
            raise ConfigError(f"{path}: member {m['name']!r} starts from {init!r}, which is not 'base' or an "
                              "earlier member")
        bad = set(m) - _TRAIN_KEYS - {"name", "init", "sources"}
        if bad:
            raise ConfigError(f"{path}: member {m['name']!r} has unknown key(s) {sorted(bad)}")
    for name, spec in [("base", cfg["base"])] + [(m["name"], m) for m in cfg["member"]]:
        for src in spec.get("sources", []):
            bad = set(src) - _SOURCE_KEYS if isinstance(src, dict) else {"(not a table)"}
            if bad or "path" not in src:
                raise ConfigError(f"{path}: {name!r}: a source needs `path` and may have {sorted(_SOURCE_KEYS)}; "
                                  f"got {src!r}")
            tasks = src.get("tasks")
            if tasks is not None and (not isinstance(tasks, list) or not tasks
                                      or not all(isinstance(t, str) and t for t in tasks)):
                raise ConfigError(f"{path}: {name!r}: source tasks must be a non-empty list of task names")
    return cfg


def _task_subset(suite: Path, out: Path, src: dict[str, Any]) -> str:
    """The source's file, or (with `tasks`) a copy holding only those tasks' records: per-task mixture rates."""
    if not src.get("tasks"):
        return str(suite / src["path"])
    tasks = list(src["tasks"])
    dest = out / "sources" / f"{Path(src['path']).stem}.{'+'.join(tasks)}.jsonl"
    if not dest.exists():
        lines = [line for line in (suite / src["path"]).read_text().splitlines()
                 if line.strip() and json.loads(line).get("task") in tasks]
        if not lines:
            raise ConfigError(f"{src['path']}: no records of tasks {tasks}")
        sync.write_text(str(dest), "\n".join(lines) + "\n")  # process 0, atomic
    sync.barrier(f"build-pool/source/{dest.name}")  # the others read it next
    return str(dest)


def _train_run(run_dir: Path, suite: Path, spec: dict[str, Any], shared: dict[str, Any], model,
               init_from: str | None, tokenizer: str = "byte") -> dict[str, Any]:
    from ptm.data.pipeline import DataConfig, SourceConfig
    from ptm.parallel.mesh import MeshConfig
    from ptm.train.loop import train
    from ptm.train.optimizer import OptimizerConfig

    hp = {**shared, **{k: v for k, v in spec.items() if k in _TRAIN_KEYS}}
    sources = [SourceConfig(path=_task_subset(suite, run_dir.parent.parent, s),
                            name=Path(s["path"]).stem + (f".{'+'.join(s['tasks'])}" if s.get("tasks") else ""),
                            max_examples=s.get("max_examples"), epochs=float(s.get("epochs", 1.0)),
                            rate=float(s.get("rate", 1.0)))
               for s in spec["sources"]]
    data = DataConfig(sources=sources, seq_len=int(hp.get("seq_len", 128)),
                      global_batch_size=int(hp.get("global_batch_size", 32)), seed=int(hp.get("seed", 0)),
                      num_epochs=int(hp.get("num_epochs", 1)))
    opt = OptimizerConfig(learning_rate=float(hp.get("learning_rate", 3e-3)),
                          warmup_ratio=float(hp.get("warmup_ratio", 0.05)),
                          weight_decay=float(hp.get("weight_decay", 0.0)))
    t0 = time.perf_counter()
    res = train(str(run_dir), data=data, model=model, optimizer=opt,
                mesh=MeshConfig(data=1, fsdp=-1, tensor=1), tokenizer=tokenizer, init_from=init_from,
                save_every=10**9,
                keep_checkpoints=1, async_checkpointing=False,
                log_every=25, seed=int(hp.get("seed", 0)), progress=False)
    return {"run_dir": str(run_dir), "steps": res.steps, "final_loss": res.final_loss,
            "seconds": round(time.perf_counter() - t0, 1), "init_from": init_from}


def pool_model(spec: Any, config_path: str):
    """`model = "PRESET"` (ptm/gin/models/PRESET.gin), a table with `preset = "NAME"` plus fields to change,
    or a table of every field."""
    from ptm.model.config import from_spec

    where = f"{config_path}: bad [model]"
    try:
        return from_spec(spec, where)
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from e


def build_pool(config_path: str, out_dir: str) -> dict[str, Any]:
    """Generate the toy suite, train theta_pre and every pool member; skip runs that already finished.

    Writes `<out>/pool.json` (members, base, suite, timings) and returns it. SPMD on several processes: every
    process trains every run together, only process 0 writes the suite, task subsets and pool.json.
    """
    from ptm.toy.suite import generate_suite

    cfg = load_pool_config(config_path)
    model = pool_model(cfg["model"], config_path)
    out = Path(out_dir)
    suite = out / "suite"
    if sync.is_writer():  # SPMD (`ptm search build-pool` on every host): one writer, the others wait for it
        generate_suite(suite, seed=int(cfg["suite"].get("seed", 0)), sizes=cfg["suite"].get("sizes"))
    sync.barrier("build-pool/suite")
    shared = cfg.get("train", {})
    tokenizer = cfg.get("tokenizer", "byte")  # "byte", or a path (relative: against the suite, e.g. its own)
    if not isinstance(tokenizer, str):
        raise ConfigError(f"{config_path}: tokenizer must be a string, got {tokenizer!r}")
    if tokenizer != "byte" and "://" not in tokenizer and not Path(tokenizer).is_absolute():
        tokenizer = str(suite / tokenizer)
    runs: dict[str, dict[str, Any]] = {}
    order = [("base", cfg["base"], None)] + [(m["name"], m, m.get("init", "base")) for m in cfg["member"]]
    for name, spec, init in order:
        run_dir = out / "runs" / name
        if sync.broadcast_json(f"build-pool/{name}", (run_dir / "run.json").exists()):  # process 0 decides
            runs[name] = {"run_dir": str(run_dir), "cached": True, "init_from": init}
            print(f"build-pool: {name}: already trained", file=sys.stderr)
            continue
        print(f"build-pool: training {name} (init {init or 'random'})", file=sys.stderr, flush=True)
        init_path = str(out / "runs" / init) if init else None
        runs[name] = _train_run(run_dir, suite, spec, shared, model, init_path, tokenizer)
        print(f"build-pool: {name}: {runs[name]['steps']} steps, loss {runs[name]['final_loss']}, "
              f"{runs[name]['seconds']} s", file=sys.stderr, flush=True)
    pool = {"config": str(config_path), "suite": str(suite), "base": str(out / "runs" / "base"),
            "members": [str(out / "runs" / m["name"]) for m in cfg["member"]], "runs": runs}
    sync.barrier("build-pool/done")  # every member's run.json exists
    sync.write_text(str(out / "pool.json"), json.dumps(pool, indent=1))  # process 0 only, atomic
    return pool
