"""`ptm search`: CMA-ES merge search over a checkpoint pool (`ptm search run`), and `ptm search build-pool`,
which trains the toy pool (`ptm.toy.pool.build_pool`). Thin handlers; the study is `ptm.search.study`.
Also runnable as `python -m ptm.search.commands ...`.
"""

from __future__ import annotations

import argparse
import json
import sys


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
    r.add_argument("--mesh", nargs="?", const="1,-1,1", default=None, metavar="DATA,FSDP,TENSOR",
                   help="keep the pool sharded over a mesh of all devices (bare --mesh: 1,-1,1; overrides the "
                   "config's [mesh]); on several processes a mesh is always used")
    r.add_argument("--no-baselines", action="store_true")
    r.set_defaults(func=_run_cmd)


def _build_pool_cmd(args: argparse.Namespace) -> int:
    from ptm.parallel import distributed, sync
    from ptm.toy.pool import build_pool

    distributed.initialize()  # SPMD: every host trains every member together (ptm.train.loop is multi-host)
    pool = build_pool(args.config, args.out)  # only process 0 writes files (suite, sources, pool.json)
    if sync.is_writer():
        print(json.dumps({"base": pool["base"], "members": pool["members"], "suite": pool["suite"]}, indent=1))
    return 0


def _run_cmd(args: argparse.Namespace) -> int:
    from ptm.parallel import distributed, sync
    from ptm.search.config import SearchConfig
    from ptm.search.objective import parse_objective
    from ptm.search.study import run

    distributed.initialize()  # before anything touches jax devices; every host runs the same study
    cfg = SearchConfig.from_toml(args.config) if args.config else SearchConfig()
    objectives = [parse_objective(o) for o in args.objective] if args.objective else None
    cfg = cfg.with_overrides(pool=args.pool, base=args.base, val=args.val, test=args.test,
                             objectives=objectives,
                             space=args.space, layer_groups=args.layer_groups, budget_evals=args.budget_evals,
                             budget_seconds=args.budget_seconds, seed=args.seed,
                             baselines=False if args.no_baselines else None)
    if args.mesh is not None:
        from ptm.parallel.spmd import parse_mesh_spec

        m = parse_mesh_spec(args.mesh)
        cfg = cfg.with_overrides(mesh={"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor})
    summary = run(cfg, args.out, use_mesh=args.mesh is not None, progress=sync.is_writer())
    if sync.is_writer():
        print(json.dumps(summary["headline"], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    from ptm.errors import PtmError

    parser = argparse.ArgumentParser(prog="python -m ptm.search.commands")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PtmError as e:
        print(f"ptm search: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
