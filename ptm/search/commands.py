"""`ptm search`: CMA-ES merge search over a checkpoint pool, and `ptm search build-pool` for the toy pool.

Thin handlers over `ptm.merge.search` (the search) and `build_pool` below (trains the toy pool from a TOML
file).
Also runnable as `python -m ptm.merge.search_commands ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ptm.errors import ConfigError
from ptm.toml_file import load_toml

# ----------------------------------------------------------------------------------------- toy pool builder

_TRAIN_KEYS = {"seq_len", "global_batch_size", "learning_rate", "warmup_ratio", "weight_decay", "seed",
               "num_epochs"}


def load_pool_config(path: str) -> dict[str, Any]:
    cfg = load_toml(path, "pool config")
    for key in ("suite", "model", "base", "member"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing [{key}]")
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
    return cfg


def _train_run(run_dir: Path, suite: Path, spec: dict[str, Any], shared: dict[str, Any], model,
               init_from: str | None, tokenizer: str = "byte") -> dict[str, Any]:
    from ptm.data.pipeline import DataConfig, SourceConfig
    from ptm.parallel.mesh import MeshConfig
    from ptm.train.loop import train
    from ptm.train.optimizer import OptimizerConfig

    hp = {**shared, **{k: v for k, v in spec.items() if k in _TRAIN_KEYS}}
    sources = [SourceConfig(path=str(suite / s["path"]), name=Path(s["path"]).stem,
                            max_examples=s.get("max_examples"), epochs=float(s.get("epochs", 1.0)))
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


def build_pool(config_path: str, out_dir: str) -> dict[str, Any]:
    """Generate the toy suite, train theta_pre and every pool member; skip runs that already finished.

    Writes `<out>/pool.json` (members, base, suite, timings) and returns it.
    """
    from ptm.model.config import ModelConfig
    from ptm.toy.suite import generate_suite

    cfg = load_pool_config(config_path)
    out = Path(out_dir)
    suite = out / "suite"
    generate_suite(suite, seed=int(cfg["suite"].get("seed", 0)), sizes=cfg["suite"].get("sizes"))
    try:
        model = ModelConfig(**cfg["model"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{config_path}: bad [model]: {e}") from e
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
        if (run_dir / "run.json").exists():
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
    (out / "pool.json").write_text(json.dumps(pool, indent=1))
    return pool


# --------------------------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="CMA-ES search for linear-merge weights over a pool of checkpoints",
                       description="Search merge weights over a checkpoint pool (`ptm search run ...`), or "
                       "train the toy pool (`ptm search build-pool ...`). See docs/search.md.")
    ss = p.add_subparsers(dest="search_command", required=True)

    b = ss.add_parser("build-pool", help="train the toy checkpoint pool from a TOML config")
    b.add_argument("config", help="pool config, e.g. configs/search/toy_pool.toml")
    b.add_argument("--out", required=True, help="output dir (suite/, runs/<member>/, pool.json)")
    b.set_defaults(func=_build_pool_cmd)

    r = ss.add_parser("run", help="run a search (single objective or Pareto sweep)")
    r.add_argument("--config", help="search TOML (configs/search/*.toml); flags below override it")
    r.add_argument("--pool", nargs="+", help="checkpoints: paths or globs, local or gs://")
    r.add_argument("--base", help="theta_pre for task-vector search spaces and TA/TIES/DARE baselines")
    r.add_argument("--val", help="validation eval files/dir (searched on)")
    r.add_argument("--test", help="test eval files/dir (final report only)")
    r.add_argument("--objective", action="append",
                   help="weighted tasks 'task[:weight],task...'; repeat 2-3 times for Pareto mode")
    r.add_argument("--space", choices=["simplex", "task_vector"], help="search space (default simplex)")
    r.add_argument("--layer-groups", type=int,
                   help="per-layer-group weights: number of layer groups (0: off)")
    r.add_argument("--budget-evals", type=int, help="candidate evaluations (per Pareto point)")
    r.add_argument("--budget-seconds", type=float, help="wall-clock budget in seconds (per Pareto point)")
    r.add_argument("--seed", type=int)
    r.add_argument("--out", required=True, help="output dir (resumes from its search_log.jsonl)")
    r.add_argument("--mesh", action="store_true", help="keep the pool sharded over all devices (fsdp mesh)")
    r.add_argument("--no-baselines", action="store_true")
    r.set_defaults(func=_run_cmd)


def _build_pool_cmd(args: argparse.Namespace) -> int:
    pool = build_pool(args.config, args.out)
    print(json.dumps({"base": pool["base"], "members": pool["members"], "suite": pool["suite"]}, indent=1))
    return 0


def _run_cmd(args: argparse.Namespace) -> int:
    from ptm.search import study as S

    cfg = S.SearchConfig.from_toml(args.config) if args.config else S.SearchConfig()
    objectives = [S.parse_objective(o) for o in args.objective] if args.objective else None
    cfg = cfg.with_overrides(pool=args.pool, base=args.base, val=args.val, test=args.test,
                             objectives=objectives,
                             space=args.space, layer_groups=args.layer_groups, budget_evals=args.budget_evals,
                             budget_seconds=args.budget_seconds, seed=args.seed,
                             baselines=False if args.no_baselines else None)
    summary = S.run(cfg, args.out, use_mesh=args.mesh)
    print(json.dumps(summary["headline"], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    from ptm.errors import PtmError

    parser = argparse.ArgumentParser(prog="python -m ptm.merge.search_commands")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PtmError as e:
        print(f"ptm search: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
